// What the agent asks of the app's machine learning: train a downloaded .mlmodel on the
// device's own data, and evaluate one on held-out data. The Core ML implementation lives in
// Apple/ (CoreMLTrainer); tests use deterministic trainers.
import Foundation

/// A trained model's updatable parameters and how the training went.
public struct TrainResult: Sendable, Equatable {
    /// Every updatable weight **and** bias, in Core ML layout, each exactly once.
    public var tensors: [NamedTensor]
    public var numExamples: Int
    public var loss: Float
    public var accuracy: Float
    public var seconds: Float

    public init(
        tensors: [NamedTensor], numExamples: Int, loss: Float, accuracy: Float,
        seconds: Float
    ) {
        self.tensors = tensors
        self.numExamples = numExamples
        self.loss = loss
        self.accuracy = accuracy
        self.seconds = seconds
    }
}

/// Loss and accuracy of a model on the device's held-out examples.
public struct EvaluationResult: Sendable, Equatable {
    public var numExamples: Int
    public var loss: Float
    public var accuracy: Float

    public init(numExamples: Int, loss: Float, accuracy: Float) {
        self.numExamples = numExamples
        self.loss = loss
        self.accuracy = accuracy
    }
}

/// Trains and evaluates a downloaded model on the device's own data.
///
/// `modelFile` is the task's verified `.mlmodel` on disk; the agent deletes it once the task is
/// done. Training uses the task's `config` (zero fields: the model's defaults). Evaluation must
/// use held-out examples that are never trained on. Throw ``TaskAbandonedError`` to give up a
/// task (nothing is submitted); the agent checks for cancellation around both calls, and a
/// long training should check `Task.isCancelled` itself.
public protocol ModelTrainer: Sendable {
    func train(modelFile: URL, task: TrainTask) async throws -> TrainResult
    func evaluate(modelFile: URL, task: EvaluateTask) async throws -> EvaluationResult
}
