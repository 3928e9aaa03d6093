// An app that depends on FedCoreMLApple gets the kit's core (DeviceAgent, the messages, ...) too.
@_exported import FedCoreML
