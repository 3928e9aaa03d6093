"""deploy/: Dockerfiles, Compose files, Kubernetes manifests and the certificate script.

No container engine is needed (nor used): every command a container would run is parsed by the
real parser of the program it names (fedcoreml's, make-certs', Flower's), so a renamed or
removed flag fails here; the Kubernetes manifests are validated offline against the Kubernetes
JSON schemas bundled in kubernetes-validate; the build context the ignore files leave is built
into a wheel; the certificate script and the coordinator's entry point are run for real.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {
    "coordinator": DEPLOY / "coordinator.Dockerfile",
    "devices": DEPLOY / "devices.Dockerfile",
}
IMAGES = {"fedcoreml-coordinator": "coordinator", "fedcoreml-devices": "devices"}
KUBERNETES_VERSION = "1.31"  # the oldest Kubernetes the manifests are checked against
BASE_IMAGE = "python:3.11-slim"


def _load_script(name: str) -> ModuleType:
    """A script under deploy/ (a hyphenated file name, so not importable by name)."""
    path = DEPLOY / name
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("-", "_"), path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_certs = _load_script("make-certs.py")
entrypoint = _load_script("coordinator-entrypoint.py")


# -- parsing what a container runs ----------------------------------------------------------


def _parse(parser: Any, argv: list[str], what: str) -> Any:
    """``parser.parse_args(argv)``; an argparse error becomes a test failure that quotes it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{what}: {shlex.join(argv)} is refused by its parser: {err.getvalue()}")


def parse_command(argv: list[str], what: str) -> tuple[str, Any]:
    """Parse a container's full command line with the real parser of the program it runs.

    Returns the program and the parsed arguments; for the coordinator's entry point, the
    ``fedcoreml server`` arguments it will run.
    """
    from fedcoreml.server.cli import build_parser

    program, args = argv[0], argv[1:]
    if program == "fedcoreml":
        return program, _parse(build_parser(), args, what)
    if program == "fedcoreml-coordinator":
        parsed = _parse(build_parser(), ["server", *args], what)
        assert parsed.command == "server"
        return program, parsed
    if program == "fedcoreml-make-certs":
        return program, _parse(make_certs.build_parser(), args, what)
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return program, _parse(_parse_args_run_superlink(), args, what)
    if program == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return program, _parse(_parse_args_run_supernode(), args, what)
    pytest.fail(f"{what}: runs {program!r}, which this test does not know how to check")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- Dockerfiles ----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: ends inside a continued line"
    return instructions


def instruction_args(path: Path, keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile_instructions(path) if key == keyword]


def exec_form(value: str, what: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"{what} is not in exec (JSON array) form: {value}")
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed), what
    return parsed


def image_command(image: str) -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD of the image built from deploy/<image>.Dockerfile."""
    path = DOCKERFILES[image]
    (entry,) = instruction_args(path, "ENTRYPOINT")
    (cmd,) = instruction_args(path, "CMD")
    return exec_form(entry, f"{path.name} ENTRYPOINT"), exec_form(cmd, f"{path.name} CMD")


def readme_install_command() -> str:
    """The README's install command without ``-e``: what the devices image runs."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r'^(pip install -e "\.\[devices\]") && fedcoreml demo$', readme, flags=re.M)
    assert match, (
        'README.md no longer has the `pip install -e ".[devices]" && fedcoreml demo` command'
    )
    return match.group(1).replace(" -e ", " ")


# The coordinator never loads TensorFlow (tests/test_layering.py), so its image is the base
# install; the simulated devices (and Flower's SuperNodes running the ClientApp) need the extra.
IMAGE_INSTALLS = {"coordinator": "pip install .", "devices": 'pip install ".[devices]"'}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_installs_what_the_image_needs(image: str) -> None:
    path = DOCKERFILES[image]
    assert readme_install_command() == IMAGE_INSTALLS["devices"]
    expected = IMAGE_INSTALLS[image]
    pip_steps = [
        step.strip()
        for run in instruction_args(path, "RUN")
        for step in run.split("&&")
        if re.match(r"\s*(python -m )?pip3? ", step)
    ]
    assert pip_steps == [expected], f"{path.name}: pip steps {pip_steps}, expected [{expected!r}]"
    # Every file the Dockerfile copies exists.
    for copy in instruction_args(path, "COPY"):
        sources = [word for word in copy.split() if not word.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file"


def test_the_coordinator_image_installs_no_tensorflow() -> None:
    """The base install (the coordinator image's) requires neither TensorFlow nor flwr-datasets;
    the devices extra brings both, and every extra's requirement names a real distribution."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}

    base = names(project["dependencies"])
    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    assert not base & {"tensorflow", "tensorflow-cpu", "flwr-datasets", "grpcio-tools"}, base
    assert {"tensorflow-cpu", "flwr-datasets"} <= extras["devices"]
    assert extras["devices"] <= extras["simulation"], "the ClientApp trains like a device"
    assert "grpcio-tools" in extras["dev"]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_base_user_and_command(image: str) -> None:
    path = DOCKERFILES[image]
    instructions = dockerfile_instructions(path)
    args = dict(rest.split("=", 1) for key, rest in instructions if key == "ARG" and "=" in rest)
    (base,) = instruction_args(path, "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base == BASE_IMAGE, f"{path.name}: FROM {base}"

    # The image ends as a fixed, numeric, non-root user that the Dockerfile creates.
    users = [index for index, (key, _) in enumerate(instructions) if key == "USER"]
    assert users, f"{path.name}: no USER: the container would run as root"
    user = instructions[users[-1]][1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {user} is not a non-root uid"
    runs = " ".join(instruction_args(path, "RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid or uid}" in runs
    last_run = max(index for index, (key, _) in enumerate(instructions) if key == "RUN")
    assert users[-1] > last_run, f"{path.name}: a RUN step comes after the last USER"

    entry, cmd = image_command(image)
    program, parsed = parse_command(entry + cmd, f"{path.name} ENTRYPOINT + CMD")
    if image == "coordinator":
        assert program == "fedcoreml-coordinator"
        assert parsed.tls_cert is not None and not parsed.insecure, "TLS by default"
    else:
        assert (program, parsed.command) == ("fedcoreml", "devices")
        assert parsed.ca_cert is not None, "TLS by default"


def test_coordinator_dockerfile_volume_port_and_healthcheck() -> None:
    path = DOCKERFILES["coordinator"]
    volumes = [v for value in instruction_args(path, "VOLUME") for v in exec_form(value, "VOLUME")]
    assert "/runs" in volumes
    (exposed,) = instruction_args(path, "EXPOSE")
    port = int(exposed.split("/")[0])
    entry, cmd = image_command("coordinator")
    _, parsed = parse_command(entry + cmd, "coordinator CMD")
    assert host_port(parsed.listen) == ("0.0.0.0", port)
    assert PurePosixPath(parsed.run_dir).is_relative_to("/runs")

    (healthcheck,) = instruction_args(path, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period" in options
    argv = exec_form(command, "HEALTHCHECK CMD")
    assert argv[0] == "python" and f", {port})" in argv[-1], argv
    assert instruction_args(DOCKERFILES["devices"], "HEALTHCHECK") == ["NONE"]


def test_healthcheck_fails_until_the_port_listens() -> None:
    """Run the coordinator image's HEALTHCHECK command against a free port, then a listener."""
    (healthcheck,) = instruction_args(DOCKERFILES["coordinator"], "HEALTHCHECK")
    argv = exec_form(healthcheck.partition("CMD ")[2], "HEALTHCHECK CMD")
    (exposed,) = instruction_args(DOCKERFILES["coordinator"], "EXPOSE")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        free = listener.getsockname()[1]
        command = [sys.executable, *argv[1:-1], argv[-1].replace(exposed, str(free))]
        refused = subprocess.run(command, capture_output=True, timeout=30)
        assert refused.returncode != 0, "healthy although nothing listens"
        listener.listen()
        accepted = subprocess.run(command, capture_output=True, timeout=30)
        assert accepted.returncode == 0, accepted.stderr.decode()


# -- the build context ----------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as an anchored regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((include, _ignore_regex(pattern)))
    return rules


def in_context(rules: list[tuple[bool, re.Pattern[str]]], relative: str) -> bool:
    """Whether the file is sent to the builder (Docker: the last matching pattern wins; a
    pattern matches a path or any of its parent folders)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for include, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            included = include
    return included


def build_context(ignore_file: Path) -> list[str]:
    rules = ignore_rules(ignore_file)
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in names:
            relative = Path(folder, name).relative_to(REPO).as_posix()
            if in_context(rules, relative):
                files.append(relative)
    return sorted(files)


def test_ignore_files_leave_what_pip_install_needs(tmp_path: Path) -> None:
    contexts = {}
    for image, dockerfile in DOCKERFILES.items():
        ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert ignore_file.is_file(), f"no {ignore_file.name} next to {dockerfile.name}"
        contexts[image] = build_context(ignore_file)
    assert contexts["coordinator"] == contexts["devices"], "the two builds would not share layers"
    context = contexts["coordinator"]
    rules = ignore_rules(DEPLOY / "coordinator.Dockerfile.dockerignore")
    for left_out in (".git/HEAD", "tests/test_deploy.py", "bench/x.py", "runs/run/run.json"):
        assert not in_context(rules, left_out), f"{left_out} would be sent to the builder"
    assert not any("__pycache__" in f or f.endswith(".mlmodel") for f in context)
    for copied in ("pyproject.toml", "README.md", *(f"deploy/{n}" for n in ("make-certs.py",))):
        assert copied in context

    # `pip install .` from exactly those files: build the wheel, offline (so with the
    # setuptools installed here rather than a freshly downloaded one).
    pytest.importorskip("setuptools", minversion="68", reason="builds the wheel offline")
    source = tmp_path / "context"
    for relative in context:
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes((REPO / relative).read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("fedcoreml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    for package, folder in package_dirs.items():
        modules = [p.relative_to(REPO / folder) for p in (REPO / folder).rglob("*.py")]
        assert modules, folder
        for module in modules:
            assert f"{package.replace('.', '/')}/{module.as_posix()}" in names
    assert "fedcoreml/ios_bridge/data/mnist_sample.npz" in names


# -- Compose --------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, what: str) -> Any:
    """Compose's ${VAR:-default} interpolation with the defaults (no .env, empty environment);
    a variable without a default fails: `docker compose up` must work as it is."""
    if isinstance(value, dict):
        return {key: interpolate(item, what) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, what) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) is None:
            pytest.fail(f"{what}: {match.group(0)} has no default")
        return match.group(2)

    return _VARIABLE.sub(replace, value)


# The service keys these files may use (a subset of the Compose specification): a misspelt key
# fails here rather than being ignored. Extend it when a file needs another one.
SERVICE_KEYS = {
    "build", "command", "cpus", "depends_on", "deploy", "entrypoint", "environment", "env_file",
    "healthcheck", "image", "init", "mem_limit", "ports", "read_only", "restart", "secrets",
    "stop_grace_period", "stop_signal", "tmpfs", "user", "volumes", "working_dir",
}  # fmt: skip


def load_compose(name: str) -> dict[str, Any]:
    path = DEPLOY / name
    data = interpolate(yaml.safe_load(path.read_text()), name)
    assert isinstance(data.get("services"), dict) and data["services"], f"{name}: no services"
    for key in set(data) - {"name", "services", "volumes", "networks", "secrets", "configs"}:
        assert key.startswith("x-"), f"{name}: unknown top-level key {key}"
    for service, config in data["services"].items():
        unknown = set(config) - SERVICE_KEYS
        assert not unknown, f"{name} {service}: unknown keys {sorted(unknown)}"
    return data


def service_image(compose: str, name: str, service: dict[str, Any]) -> str:
    """The deploy/<image>.Dockerfile a service runs; its build must use it, from the repo root."""
    image = service["image"].split(":")[0]
    assert image in IMAGES, f"{compose} {name}: unknown image {service['image']}"
    build = service["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO, f"{compose} {name}: build context"
    dockerfile = (REPO / build["dockerfile"]).resolve()
    assert dockerfile == DOCKERFILES[IMAGES[image]], f"{compose} {name}: {build['dockerfile']}"
    return IMAGES[image]


def service_argv(compose: str, name: str, service: dict[str, Any]) -> list[str]:
    image = service_image(compose, name, service)
    entry, cmd = image_command(image)
    if "entrypoint" in service:
        entry, cmd = service["entrypoint"], []
    command = service.get("command", cmd)
    assert isinstance(entry, list) and isinstance(command, list), f"{compose} {name}: exec form"
    return [str(word) for word in [*entry, *command]]


def mounts(compose: str, service: dict[str, Any], declared: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume (read-only ones marked ':ro')."""
    result = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        assert source in declared, f"{compose}: volume {source} is not declared"
        result[target] = source + (":ro" if mode == ["ro"] else "")
    return result


def under(path: str | Path, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(mount)


def test_compose_coordinator_and_devices_over_tls() -> None:
    data = load_compose("compose.yaml")
    services, declared = data["services"], data.get("volumes") or {}
    assert {"certs", "coordinator", "devices"} <= set(services)
    parsed = {
        name: parse_command(service_argv("compose.yaml", name, s), f"compose.yaml {name}")[1]
        for name, s in services.items()
    }
    volumes = {name: mounts("compose.yaml", s, declared) for name, s in services.items()}

    coordinator, devices, certs = parsed["coordinator"], parsed["devices"], parsed["certs"]
    assert coordinator.command == "server" and devices.command == "devices"
    # The run directory is on the named volume mounted at /runs, the image's VOLUME.
    assert volumes["coordinator"]["/runs"] == "runs"
    assert under(coordinator.run_dir, "/runs")
    # The published port is the one the coordinator listens on, and the one devices dial.
    host, port = host_port(coordinator.listen)
    assert host == "0.0.0.0"
    published = [p.split(":") for p in services["coordinator"]["ports"]]
    assert [int(target) for *_, target in published] == [port]
    server_host, server_port = host_port(devices.server)
    assert (server_host, server_port) == ("coordinator", port)
    assert devices.count >= coordinator.min_devices
    # TLS: the certs service writes the volume the others mount read-only; the certificate
    # names the host the devices dial.
    assert not coordinator.insecure
    assert volumes["certs"] == {certs.out.as_posix(): "certs"}
    assert certs.keep_existing, "the certs service must not fail on a second `up`"
    assert volumes["coordinator"]["/certs"] == volumes["devices"]["/certs"] == "certs:ro"
    for path in (coordinator.tls_cert, coordinator.tls_key, devices.ca_cert):
        assert under(path, "/certs") and Path(path).name in make_certs.FILES
    assert server_host in make_certs.hostnames(certs.host)
    # Start order: certificates, then a healthy coordinator, then the devices.
    assert services["coordinator"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["devices"]["depends_on"]["coordinator"]["condition"] == "service_healthy"


def test_compose_flower_superlink_and_supernodes() -> None:
    data = load_compose("compose.flower.yaml")
    services = data["services"]
    parsed = {}
    for name, service in services.items():
        program, args = parse_command(
            service_argv("compose.flower.yaml", name, service), f"compose.flower.yaml {name}"
        )
        parsed[name] = (program, args)
    superlinks = [name for name, (program, _) in parsed.items() if program == "flower-superlink"]
    nodes = [name for name, (program, _) in parsed.items() if program == "flower-supernode"]
    assert superlinks == ["superlink"] and len(nodes) >= 2
    superlink = parsed["superlink"][1]
    assert superlink.host == "0.0.0.0"
    assert not superlink.runtime_dependency_install, "no `uv sync` inside the image"
    published = [p.split(":") for p in services["superlink"]["ports"]]
    assert [int(target) for *_, target in published] == [superlink.port]
    health = " ".join(services["superlink"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{superlink.port}/health" in health

    partitions = []
    for name in nodes:
        node = parsed[name][1]
        assert host_port(node.superlink) == ("superlink", superlink.port), name
        config = dict(item.split("=") for item in node.node_config.split())
        assert int(config["num-partitions"]) == len(nodes), name
        partitions.append(int(config["partition-id"]))
        assert services[name]["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert sorted(partitions) == list(range(len(nodes)))


def test_compose_check_catches_a_renamed_flag() -> None:
    """The command checks above are not vacuous: a flag the parser lacks fails them."""
    with pytest.raises(pytest.fail.Exception, match="--clientappio-api-address"):
        parse_command(
            ["flower-supernode", "--insecure", "--clientappio-api-address", "0.0.0.0:9094"], "x"
        )
    with pytest.raises(pytest.fail.Exception, match="--ca-cerificate"):
        parse_command(["fedcoreml", "devices", "--server", "a:1", "--count", "1",
                       "--ca-cerificate", "ca.pem"], "x")  # fmt: skip


# -- Kubernetes -----------------------------------------------------------------------------


def k8s_resources() -> dict[tuple[str, str], dict[str, Any]]:
    resources = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                resources[(document["kind"], document["metadata"]["name"])] = document
    return resources


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    namespace = kustomization["namespace"]
    for (kind, name), resource in k8s_resources().items():
        if kind != "Namespace":
            assert resource["metadata"].get("namespace") == namespace, f"{kind}/{name}"
    assert ("Namespace", namespace) in k8s_resources()


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate  # the dev extra; its schemas ship with it (no network)

    resources = k8s_resources()
    assert {kind for kind, _ in resources} >= {
        "Namespace", "PersistentVolumeClaim", "Deployment", "Service", "Job"
    }  # fmt: skip
    for (kind, name), resource in resources.items():
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{kind}/{name}: {where}: {exc.message}")
    # ... and the validation is not vacuous: a misspelt field and a wrong type are caught.
    deployment = resources[("Deployment", "fedcoreml-coordinator")]
    broken = json.loads(json.dumps(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenessprobe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _container(resource: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = resource["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def _pod_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def _check_non_root(kind: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, kind
    image_user = instruction_args(DOCKERFILES[IMAGES[container["image"].split(":")[0]]], "USER")
    assert str(security["runAsUser"]) == image_user[-1].split(":")[0], kind
    assert container["securityContext"]["allowPrivilegeEscalation"] is False, kind
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], kind


def test_k8s_coordinator_deployment_service_and_storage() -> None:
    resources = k8s_resources()
    deployment = resources[("Deployment", "fedcoreml-coordinator")]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "RWO run dir: never two pods"
    pod, container = _container(deployment)
    _check_non_root("coordinator", pod, container)
    image = IMAGES[container["image"].split(":")[0]]
    assert image == "coordinator"
    entry, _ = image_command(image)
    _, args = parse_command(entry + container["args"], "k8s coordinator args")
    assert not args.insecure

    # Port: --listen, the container port, every probe, the Service's target port.
    (port,) = container["ports"]
    assert host_port(args.listen) == ("0.0.0.0", port["containerPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] in (port["name"], port["containerPort"])
    service = resources[("Service", "fedcoreml-coordinator")]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("fedcoreml-coordinator", "fedcoreml-coordinator.fedcoreml.svc.cluster.local"):
        assert name in make_certs.DEFAULT_HOSTS

    # Storage: the run directory on the ReadWriteOnce claim; TLS from the fedcoreml-tls Secret.
    volumes = _pod_mounts(pod, container)
    run_mount = next(path for path in volumes if under(args.run_dir, path))
    claim = volumes[run_mount]["persistentVolumeClaim"]["claimName"]
    assert resources[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    tls_mount = next(path for path in volumes if under(args.tls_cert, path))
    assert volumes[tls_mount]["secret"]["secretName"] == "fedcoreml-tls"
    # `kubectl create secret tls` stores the files as tls.crt and tls.key.
    assert (args.tls_cert.as_posix(), args.tls_key.as_posix()) == (
        f"{tls_mount}/tls.crt",
        f"{tls_mount}/tls.key",
    )
    _check_writable_scratch(pod, container)


def _check_writable_scratch(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """A read-only root file system leaves /tmp and the image user's home writable."""
    if not container["securityContext"].get("readOnlyRootFilesystem"):
        return
    image = IMAGES[container["image"].split(":")[0]]
    home = re.search(r"--home-dir (\S+)", " ".join(instruction_args(DOCKERFILES[image], "RUN")))
    assert home, image
    volumes = _pod_mounts(pod, container)
    for path in ("/tmp", home.group(1)):
        assert "emptyDir" in volumes.get(path, {}), f"{image}: {path} is not writable"


def test_k8s_devices_job_dials_the_service_over_tls() -> None:
    resources = k8s_resources()
    job = resources[("Job", "fedcoreml-devices")]
    pod, container = _container(job)
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    _check_non_root("devices", pod, container)
    image = IMAGES[container["image"].split(":")[0]]
    entry, _ = image_command(image)
    _, args = parse_command(entry + container["args"], "k8s devices args")
    assert args.command == "devices"
    service = resources[("Service", "fedcoreml-coordinator")]
    (service_port,) = service["spec"]["ports"]
    assert host_port(args.server) == (service["metadata"]["name"], service_port["port"])
    assert service["metadata"]["name"] in make_certs.DEFAULT_HOSTS
    coordinator = resources[("Deployment", "fedcoreml-coordinator")]
    _, coordinator_container = _container(coordinator)
    _, coordinator_args = parse_command(
        image_command("coordinator")[0] + coordinator_container["args"], "k8s coordinator args"
    )
    assert args.count >= coordinator_args.min_devices
    volumes = _pod_mounts(pod, container)
    ca_mount = next(path for path in volumes if under(args.ca_cert, path))
    assert volumes[ca_mount]["configMap"]["name"] == "fedcoreml-ca"
    assert Path(args.ca_cert).name == "ca.pem"
    _check_writable_scratch(pod, container)


# -- the certificate script -----------------------------------------------------------------


def _run_make_certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "make-certs.py"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_make_certs_writes_a_chain_that_verifies(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    out = tmp_path / "certs"
    result = _run_make_certs("--out", str(out), "--host", "fl.example.org", "--host", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(make_certs.FILES)  # no CA key left
    assert stat.S_IMODE((out / "server-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.pem").stat().st_mode) == 0o644
    # What to run for Kubernetes, with the names the manifests use.
    assert "create secret tls fedcoreml-tls" in result.stdout
    assert "create configmap fedcoreml-ca --from-file=ca.pem=" in result.stdout

    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    expected = make_certs.hostnames(["fl.example.org", "10.1.2.3"])
    assert dns | ips == set(expected)
    # A full verification, as a TLS client does it, for names the deployments dial ...
    verifier = PolicyBuilder().store(Store([ca]))
    for name in ("coordinator", "fedcoreml-coordinator.fedcoreml.svc", "fl.example.org"):
        verifier.build_server_verifier(x509.DNSName(name)).verify(server, [])
    # ... and not for a name that is not in it.
    with pytest.raises(VerificationError):
        verifier.build_server_verifier(x509.DNSName("elsewhere.example")).verify(server, [])


def _make_certs_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """make-certs' main() in this process (faster than a subprocess); its code and stderr."""
    code = make_certs.main(list(args))
    return code, capsys.readouterr().err


def test_make_certs_never_overwrites_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "certs")
    assert _make_certs_in_process(capsys, "--out", out) == (0, "")
    files = [tmp_path / "certs" / name for name in make_certs.FILES]
    before = [path.read_bytes() for path in files]

    code, err = _make_certs_in_process(capsys, "--out", out)
    assert code != 0 and "--force" in err
    assert _make_certs_in_process(capsys, "--out", out, "--keep-existing") == (0, "")
    assert [path.read_bytes() for path in files] == before

    files[1].unlink()  # a partial set is never completed silently
    code, err = _make_certs_in_process(capsys, "--out", out, "--keep-existing")
    assert code != 0 and "--force" in err and not files[1].exists()

    assert _make_certs_in_process(capsys, "--out", out, "--force") == (0, "")
    after = [path.read_bytes() for path in files]
    assert all(new != old for new, old in zip(after, before, strict=True))


def test_generated_certificates_serve_grpc_tls_for_the_service_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gRPC TLS handshake with the script's files, as a device dialling `coordinator` does."""
    from concurrent import futures

    import grpc

    from fedcoreml.ios_bridge.channel import channel_credentials
    from fedcoreml.server.gateway.tls import server_credentials

    out = tmp_path / "certs"
    assert _make_certs_in_process(capsys, "--out", str(out)) == (0, "")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(out / "server.pem", out / "server-key.pem")
    )
    server.start()
    try:
        for name, ok in (("coordinator", True), ("fedcoreml-coordinator", True), ("evil", False)):
            channel = grpc.secure_channel(
                f"127.0.0.1:{port}",
                channel_credentials(out / "ca.pem"),
                options=[("grpc.ssl_target_name_override", name)],
            )
            try:
                grpc.channel_ready_future(channel).result(timeout=5 if ok else 1)
                connected = True
            except grpc.FutureTimeoutError:
                connected = False
            finally:
                channel.close()
            assert connected is ok, name
    finally:
        server.stop(0)


# -- the coordinator's entry point ----------------------------------------------------------


def test_entrypoint_starts_a_new_run_and_resumes_an_existing_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["--listen", "0.0.0.0:50051", "--run-dir", str(run_dir), "--rounds", "3",
            "--min-devices", "2", "--tls-cert", "/c/s.pem", "--tls-key", "/c/k.pem"]  # fmt: skip
    assert entrypoint.server_argv(argv) == ["server", *argv]
    run_dir.mkdir()
    assert entrypoint.server_argv(argv) == ["server", *argv], "an empty folder is a new run"
    (run_dir / "run.json").write_text("{}")
    resumed = entrypoint.server_argv(argv)
    assert resumed == ["server", "--resume", str(run_dir), "--listen", "0.0.0.0:50051"]
    _, parsed = parse_command(["fedcoreml", *resumed], "resumed")
    assert parsed.resume == run_dir and parsed.rounds is None
    explicit = ["--resume", str(run_dir)]
    assert entrypoint.server_argv(explicit) == ["server", *explicit]
    assert entrypoint.server_argv([*argv, "--linger"])[-1] == "--linger"  # kept on resume


def test_entrypoint_runs_the_coordinator_and_stops_on_sigterm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(DEPLOY / "coordinator-entrypoint.py"), "--listen", "127.0.0.1:0",
         "--run-dir", str(run_dir), "--rounds", "1", "--min-devices", "1", "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "run.json").exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, output  # 128 + SIGTERM
    assert "listening for devices on port" in output
    assert "stopped by SIGTERM" in output and f"--resume {run_dir}" in output
