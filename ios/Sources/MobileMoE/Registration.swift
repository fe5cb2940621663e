// Registers MobileMoE and the dense baseline with mlx-swift-lm's public
// model-type registry (no fork of mlx-swift-lm), and loads a model directory.

import Foundation
import MLX
import MLXLLM
import MLXLMCommon

public enum MobileMoERegistration {
    /// The `model_type` values this package adds.
    public static let modelTypes = ["mobilemoe", "mobilellm_pro"]

    /// Adds "mobilemoe" and "mobilellm_pro" to `registry` (mlx-swift-lm's shared
    /// LLM registry by default), so LLMModelFactory and ModelContainer load
    /// converted directories like any other model. Call once at launch;
    /// calling again replaces the creators with the same ones.
    public static func register(
        in registry: ModelTypeRegistry<LanguageModel> = LLMTypeRegistry.shared
    ) async {
        await registry.registerModelType(
            "mobilemoe",
            creator: { data in
                try MobileMoEModel(
                    JSONDecoder().decode(MobileMoEConfiguration.self, from: data))
            })
        await registry.registerModelType(
            "mobilellm_pro",
            creator: { data in
                try MobileLLMProModel(
                    JSONDecoder().decode(MobileLLMProConfiguration.self, from: data))
            })
    }

    /// The model of a directory with config.json and *.safetensors (a converted
    /// MobileMoE, or a synthetic dense baseline), weights loaded and evaluated.
    ///
    /// No tokenizer is loaded: the benchmark and the parity test feed token ids.
    /// For chat, load the directory with `LLMModelFactory.shared` after
    /// `register()` instead (it also loads the tokenizer).
    public static func loadModel(directory: URL) async throws -> (any LanguageModel, Data) {
        await register()
        let configURL = directory.appending(component: "config.json")
        guard let configData = try? Data(contentsOf: configURL) else {
            throw MobileMoEError.badModelDirectory(
                "\(directory.path) has no readable config.json: choose a directory written by "
                    + "convert.py or `python -m bench export-synthetic`")
        }
        let base = try JSONDecoder.json5().decode(BaseConfiguration.self, from: configData)
        guard modelTypes.contains(base.modelType) else {
            throw MobileMoEError.badModelDirectory(
                "\(directory.path) holds a \(base.modelType) model, not one of "
                    + modelTypes.joined(separator: ", "))
        }
        let model = try await LLMTypeRegistry.shared.createModel(
            configuration: configData, modelType: base.modelType)
        // Quantizes exactly the layers whose `.scales` the files carry (never the
        // router: it is not Quantizable), then requires every name to match.
        try loadWeights(
            modelDirectory: directory, model: model,
            perLayerQuantization: base.perLayerQuantization)
        return (model, configData)
    }
}
