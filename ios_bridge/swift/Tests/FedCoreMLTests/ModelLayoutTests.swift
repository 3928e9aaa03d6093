// The model layout an app bundles: read from the JSON the layout tool prints, and the checks a
// trainer applies to what Core ML gives back.
import FedCoreML
import Foundation
import Testing

/// What `python -m fedcoreml.ios_bridge.stdio_bridge --layout` prints for the default model.
private let defaultModelLayout = Data(
    """
    {"tensors": [{"name": "conv1.weights", "shape": [32, 1, 3, 3]},
     {"name": "conv1.bias", "shape": [32]}, {"name": "conv2.weights", "shape": [32, 32, 2, 2]},
     {"name": "conv2.bias", "shape": [32]}, {"name": "hidden1.weights", "shape": [500, 1152]},
     {"name": "hidden1.bias", "shape": [500]}, {"name": "hidden2.weights", "shape": [10, 500]},
     {"name": "hidden2.bias", "shape": [10]}]}
    """.utf8)

@Suite struct ModelLayoutTests {
    @Test func readsTheLayoutToolsJSON() throws {
        let layout = try JSONDecoder().decode(ModelLayout.self, from: defaultModelLayout)
        #expect(layout.tensors.count == 8)
        #expect(layout.tensors.reduce(0) { $0 + $1.count } == 585_958)
        #expect(
            layout.tensors.map { $0.layer } == [
                "conv1", "conv1", "conv2", "conv2", "hidden1", "hidden1", "hidden2", "hidden2",
            ])
        #expect(
            layout.tensors.map { $0.isBias } == [
                false, true, false, true, false, true, false, true,
            ])
        let again = try JSONDecoder().decode(ModelLayout.self, from: JSONEncoder().encode(layout))
        #expect(again == layout)
    }

    @Test func refusesALayoutThatIsNotOneOfWeightsAndBiases() {
        for bad in [
            #"{"tensors": [{"name": "conv1", "shape": [1]}]}"#,
            #"{"tensors": [{"name": ".bias", "shape": [1]}]}"#,
            #"{"tensors": [{"name": "a.bias", "shape": [1]}, {"name": "a.bias", "shape": [1]}]}"#,
            #"{"tensors": [{"name": "a.bias", "shape": [-1]}]}"#,
        ] {
            #expect(throws: TensorError.self, "\(bad)") {
                try JSONDecoder().decode(ModelLayout.self, from: Data(bad.utf8))
            }
        }
    }

    @Test func checksWhatATrainerReadsBackAgainstTheDeclaredShape() throws {
        let entry = ModelLayout.Entry(name: "hidden2.weights", shape: [10, 500])
        let layout = try ModelLayout(tensors: [entry])
        let values = (0..<5000).map { Float($0) }
        // The declared shape, or a flat view of the same values: accepted, in the declared shape.
        #expect(
            try layout.tensor(entry, values: values, reportedShape: [10, 500]).shape == [10, 500])
        #expect(try layout.tensor(entry, values: values, reportedShape: [5000]).shape == [10, 500])
        // Transposed, or the wrong number of values: refused, saying what differs.
        let transposed = #expect(throws: TensorError.self) {
            try layout.tensor(entry, values: values, reportedShape: [500, 10])
        }
        #expect(transposed?.message.contains("[500, 10]") == true)
        #expect(throws: TensorError.self) {
            try layout.tensor(entry, values: Array(values.dropLast()), reportedShape: [4999])
        }
    }
}
