// ModelTrainer on Core ML: compile the downloaded .mlmodel, run an MLUpdateTask on the app's
// samples with the task's epochs, batch size and learning rate, read every updatable layer's
// weights and biases back and check them against the model's declared layout; evaluate with
// plain predictions on held-out samples that are never trained on.
//
// Documentation followed (Apple, Core ML, developer.apple.com/documentation/coreml):
// [1] MLModel.compileModel(at:) async throws -> URL (iOS 16+): "Compile a model for a device";
//     the result is a temporary .mlmodelc the caller removes.
// [2] MLModelConfiguration.parameters with MLParameterKey.epochs / .miniBatchSize /
//     .learningRate ("the keys for the parameter dictionary in a model configuration").
// [3] MLUpdateTask(forModelAt:trainingData:configuration:progressHandlers:) (the .mlmodelc URL,
//     an MLBatchProvider) and resume() / cancel() (MLTask).
// [4] MLUpdateProgressHandlers(forEvents:progressHandler:completionHandler:) with
//     MLUpdateProgressEvent.epochEnd; MLUpdateContext.task (its state / error), .model,
//     .metrics[MLMetricKey.lossValue / .epochIndex].
// [5] MLModel.parameterValue(for:) with MLParameterKey.weights / .biases .scoped(to: layer):
//     "The value type for the weights key is an MLMultiArray ... scope this key with the name
//     of the specific neural network layer"; only updatable layers.
// [6] MLMultiArray.shape / .count / subscript(Int) (a linear offset, row-major: "calculate a
//     linear offset by summing the products of each dimension's index with the dimension's
//     stride") and .strides.
// [7] MLModel(contentsOf:) and predictions(fromBatch:) -> MLBatchProvider (count,
//     features(at:)), MLFeatureProvider.featureValue(for:).multiArrayValue.
#if canImport(CoreML)
    import CoreML
    import FedCoreML
    import Foundation

    /// The app's own data in the model's input format: training samples (with their labels as
    /// the model's training input) and held-out samples for evaluation, never trained on.
    public protocol TrainingSamples: Sendable {
        func training() async throws -> any MLBatchProvider
        /// Inputs and their true class index.
        func heldOut() async throws -> [(input: any MLFeatureProvider, label: Int)]
    }

    @available(iOS 16.0, macOS 13.0, *)
    public final class CoreMLTrainer: ModelTrainer, @unchecked Sendable {
        private let layout: ModelLayout
        private let samples: any TrainingSamples
        private let probabilities: String
        private let progress: (@Sendable (Double) -> Void)?

        /// `layout`: the model's updatable tensors (the JSON `stdio_bridge --layout` prints);
        /// `probabilities`: the model output holding class probabilities ("output" for the
        /// default model); `progress` is told the fraction of epochs done.
        public init(
            layout: ModelLayout, samples: any TrainingSamples,
            probabilities: String = "output",
            progress: (@Sendable (Double) -> Void)? = nil
        ) {
            self.layout = layout
            self.samples = samples
            self.probabilities = probabilities
            self.progress = progress
        }

        public func train(modelFile: URL, task: TrainTask) async throws -> TrainResult {
            let compiled = try await MLModel.compileModel(at: modelFile)  // [1]
            defer { try? FileManager.default.removeItem(at: compiled) }
            let configuration = MLModelConfiguration()
            var parameters: [MLParameterKey: Any] = [:]  // [2]; zero: the model's default
            if task.config.epochs > 0 { parameters[.epochs] = Int(task.config.epochs) }
            if task.config.batchSize > 0 {
                parameters[.miniBatchSize] = Int(task.config.batchSize)
            }
            if task.config.learningRate > 0 {
                parameters[.learningRate] = task.config.learningRate
            }
            configuration.parameters = parameters
            let data = try await samples.training()
            let started = ContinuousClock.now
            let context = try await update(
                compiled, data, configuration, epochs: task.config.epochs)
            let seconds = (ContinuousClock.now - started).seconds
            let tensors = try layout.tensors.map { entry in
                let key = (entry.isBias ? MLParameterKey.biases : .weights).scoped(to: entry.layer)
                // [5]
                guard let array = try context.model.parameterValue(for: key) as? MLMultiArray else {
                    throw TensorError("\(entry.name): Core ML gave no MLMultiArray for \(key)")
                }
                return try layout.tensor(  // [6]
                    entry, values: floats(array), reportedShape: array.shape.map(\.intValue))
            }
            let loss = (context.metrics[.lossValue] as? NSNumber)?.floatValue ?? .nan  // [4]
            let accuracy = try score(context.model, inputs: data, labels: nil).accuracy
            return TrainResult(
                tensors: tensors, numExamples: data.count, loss: loss, accuracy: accuracy,
                seconds: Float(seconds))
        }

        public func evaluate(modelFile: URL, task: EvaluateTask) async throws
            -> EvaluationResult
        {
            let compiled = try await MLModel.compileModel(at: modelFile)  // [1]
            defer { try? FileManager.default.removeItem(at: compiled) }
            let model = try MLModel(contentsOf: compiled)  // [7]
            let heldOut = try await samples.heldOut()
            guard !heldOut.isEmpty else { throw TaskAbandonedError("no held-out samples") }
            let batch = MLArrayBatchProvider(array: heldOut.map(\.input))
            let (loss, accuracy) = try score(model, inputs: batch, labels: heldOut.map(\.label))
            return EvaluationResult(numExamples: heldOut.count, loss: loss, accuracy: accuracy)
        }

        /// Runs the update task to its end; cancelling the calling task cancels it. [3] [4]
        private func update(
            _ compiled: URL, _ data: any MLBatchProvider, _ configuration: MLModelConfiguration,
            epochs: UInt32
        ) async throws -> MLUpdateContext {
            let once = ResumeOnce<MLUpdateContext>()
            return try await withTaskCancellationHandler {
                try await withCheckedThrowingContinuation { continuation in
                    once.set(continuation)
                    let handlers = MLUpdateProgressHandlers(
                        forEvents: [.epochEnd],
                        progressHandler: { [progress] context in
                            let epoch =
                                (context.metrics[.epochIndex] as? NSNumber)?.doubleValue ?? 0
                            progress?(min(1, (epoch + 1) / Double(max(epochs, 1))))
                        },
                        completionHandler: { context in
                            switch context.task.state {
                            case .completed: once.resume(.success(context))
                            case .cancelling: once.resume(.failure(CancellationError()))
                            default:
                                once.resume(
                                    .failure(
                                        context.task.error
                                            ?? TaskAbandonedError("Core ML's update task failed")))
                            }
                        })
                    do {
                        let task = try MLUpdateTask(
                            forModelAt: compiled, trainingData: data, configuration: configuration,
                            progressHandlers: handlers)
                        once.onCancel = { task.cancel() }
                        task.resume()
                    } catch {
                        once.resume(.failure(error))
                    }
                }
            } onCancel: {
                once.cancel()
            }
        }

        /// Mean cross-entropy and accuracy of plain predictions; `labels` nil: the labels are
        /// the batch's own training targets (the model's training input of class indices). [7]
        private func score(_ model: MLModel, inputs: any MLBatchProvider, labels: [Int]?) throws
            -> (loss: Float, accuracy: Float)
        {
            let outputs = try model.predictions(fromBatch: inputs)
            guard outputs.count > 0 else { return (.nan, 0) }
            var loss = 0.0
            var correct = 0
            for index in 0..<outputs.count {
                guard
                    let scores = outputs.features(at: index)
                        .featureValue(for: probabilities)?.multiArrayValue
                else { throw TaskAbandonedError("the model has no output '\(probabilities)'") }
                let values = floats(scores)
                let label = labels?[index] ?? trueClass(inputs.features(at: index))
                guard values.indices.contains(label) else { continue }
                loss -= log(Double(max(values[label], 1e-7)))
                correct += values.indices.max { values[$0] < values[$1] } == label ? 1 : 0
            }
            return (Float(loss / Double(outputs.count)), Float(correct) / Float(outputs.count))
        }

        /// The class index a training sample carries in the model's training target input.
        private func trueClass(_ sample: any MLFeatureProvider) -> Int {
            for name in sample.featureNames {
                if let array = sample.featureValue(for: name)?.multiArrayValue,
                    array.dataType == .int32, array.count == 1
                {
                    return array[0].intValue
                }
            }
            return -1
        }
    }

    /// The values of an MLMultiArray in row-major order of its shape, whatever its strides. [6]
    func floats(_ array: MLMultiArray) -> [Float] {
        let shape = array.shape.map(\.intValue)
        let strides = array.strides.map(\.intValue)
        var values = [Float](repeating: 0, count: array.count)
        var index = [Int](repeating: 0, count: shape.count)
        for position in 0..<values.count {
            let offset = zip(index, strides).reduce(0) { $0 + $1.0 * $1.1 }
            values[position] = array[offset].floatValue
            var axis = shape.count - 1  // next index, last axis fastest
            while axis >= 0 {
                index[axis] += 1
                if index[axis] < shape[axis] { break }
                index[axis] = 0
                axis -= 1
            }
        }
        return values
    }

    /// Resumes a continuation exactly once: from Core ML's completion or from a cancellation.
    private final class ResumeOnce<Value>: @unchecked Sendable {
        private let lock = NSLock()
        private var continuation: CheckedContinuation<Value, any Error>?
        private var cancelled = false
        var onCancel: (() -> Void)? {
            get { lock.withLock { cancelHandler } }
            set {
                let runNow = lock.withLock { () -> Bool in
                    cancelHandler = newValue
                    return cancelled
                }
                if runNow { newValue?() }
            }
        }
        private var cancelHandler: (() -> Void)?

        func set(_ continuation: CheckedContinuation<Value, any Error>) {
            lock.withLock { self.continuation = continuation }
        }

        func resume(_ result: Result<Value, any Error>) {
            let waiting = lock.withLock { () -> CheckedContinuation<Value, any Error>? in
                defer { continuation = nil }
                return continuation
            }
            waiting?.resume(with: result)
        }

        func cancel() {
            let handler = lock.withLock { () -> (() -> Void)? in
                cancelled = true
                return cancelHandler
            }
            handler?()
            resume(.failure(CancellationError()))
        }
    }
#endif
