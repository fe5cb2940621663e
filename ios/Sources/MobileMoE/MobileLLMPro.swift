// The dense baseline of the paper's speed comparisons: a MobileLLM-Pro-shaped
// model, as bench/dense.py defines it (`model_type` "mobilellm_pro").
// Same attention as MobileMoE (GQA, interleaved RoPE, weightless QK-norm), a
// SwiGLU MLP, tied embeddings. Local:global attention 3:1: local layers attend
// over a 512-token sliding window and keep a rotating 512-slot cache; the
// config's `layer_types` ("sliding_attention" / "full_attention" per layer)
// says which is which. Only the shape matters for speed and memory: the
// weights are the random ones `python -m bench export-synthetic` writes.

import Foundation
import MLX
import MLXLLM
import MLXLMCommon
import MLXNN

public struct MobileLLMProConfiguration: Codable, Sendable {
    public static let local = "sliding_attention"
    public static let global = "full_attention"

    public var modelType: String
    public var vocabularySize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var hiddenLayers: Int
    public var attentionHeads: Int
    public var kvHeads: Int
    public var headDim: Int
    public var slidingWindow: Int
    public var layerTypes: [String]
    public var rmsNormEps: Float
    public var ropeTheta: Double
    public var ropeScaling: RoPEParameters?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type"
        case vocabularySize = "vocab_size"
        case hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size"
        case hiddenLayers = "num_hidden_layers"
        case attentionHeads = "num_attention_heads"
        case kvHeads = "num_key_value_heads"
        case headDim = "head_dim"
        case slidingWindow = "sliding_window"
        case layerTypes = "layer_types"
        case rmsNormEps = "rms_norm_eps"
        case ropeTheta = "rope_theta"
        case ropeScaling = "rope_scaling"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? "mobilellm_pro"
        vocabularySize = try c.decode(Int.self, forKey: .vocabularySize)
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        hiddenLayers = try c.decode(Int.self, forKey: .hiddenLayers)
        attentionHeads = try c.decode(Int.self, forKey: .attentionHeads)
        kvHeads = try c.decode(Int.self, forKey: .kvHeads)
        headDim =
            try c.decodeIfPresent(Int.self, forKey: .headDim) ?? hiddenSize / attentionHeads
        slidingWindow = try c.decodeIfPresent(Int.self, forKey: .slidingWindow) ?? 512
        // dense.py's default pattern: every 4th layer global, the others local (3:1).
        layerTypes =
            try c.decodeIfPresent([String].self, forKey: .layerTypes)
            ?? (0 ..< hiddenLayers).map {
                ($0 + 1) % 4 == 0 ? Self.global : Self.local
            }
        rmsNormEps = try c.decodeIfPresent(Float.self, forKey: .rmsNormEps) ?? 1e-5
        ropeTheta = try c.decodeIfPresent(Double.self, forKey: .ropeTheta) ?? 500_000
        ropeScaling = try c.decodeIfPresent(RoPEParameters.self, forKey: .ropeScaling)
        guard layerTypes.count == hiddenLayers,
            layerTypes.allSatisfy({ $0 == Self.local || $0 == Self.global })
        else {
            throw MobileMoEError.unsupported(
                "layer_types must list \"\(Self.local)\" or \"\(Self.global)\" for every layer")
        }
    }
}

final class DenseDecoderLayer: Module {
    let isLocal: Bool

    @ModuleInfo(key: "self_attn") var attention: Attention
    @ModuleInfo(key: "mlp") var mlp: SwiGLU
    @ModuleInfo(key: "input_layernorm") var inputNorm: RMSNorm
    @ModuleInfo(key: "post_attention_layernorm") var postAttentionNorm: RMSNorm

    init(
        _ config: MobileLLMProConfiguration, layerType: String, rope: InterleavedRoPE,
        units: UnitWeights
    ) {
        self.isLocal = layerType == MobileLLMProConfiguration.local
        let shape = AttentionShape(
            hiddenSize: config.hiddenSize, heads: config.attentionHeads,
            kvHeads: config.kvHeads, headDim: config.headDim, eps: config.rmsNormEps)
        self._attention.wrappedValue = Attention(shape, rope: rope, units: units)
        self._mlp.wrappedValue = SwiGLU(
            dimensions: config.hiddenSize, hiddenDimensions: config.intermediateSize)
        self._inputNorm.wrappedValue = RMSNorm(dimensions: config.hiddenSize, eps: config.rmsNormEps)
        self._postAttentionNorm.wrappedValue = RMSNorm(
            dimensions: config.hiddenSize, eps: config.rmsNormEps)
        super.init()
    }

    func callAsFunction(
        _ x: MLXArray, mask: MLXFast.ScaledDotProductAttentionMaskMode, cache: KVCache?
    ) -> MLXArray {
        let h = x + attention(inputNorm(x), mask: mask, cache: cache)
        return h + mlp(postAttentionNorm(h))
    }
}

final class MobileLLMProBackbone: Module {
    let window: Int

    @ModuleInfo(key: "embed_tokens") var embedTokens: Embedding
    let layers: [DenseDecoderLayer]
    let norm: RMSNorm

    init(_ config: MobileLLMProConfiguration) throws {
        let rope = try InterleavedRoPE(
            dimensions: config.headDim, theta: config.ropeTheta, scaling: config.ropeScaling)
        self.window = config.slidingWindow
        self._embedTokens.wrappedValue = Embedding(
            embeddingCount: config.vocabularySize, dimensions: config.hiddenSize)
        let units = UnitWeights()
        self.layers = config.layerTypes.map {
            DenseDecoderLayer(config, layerType: $0, rope: rope, units: units)
        }
        self.norm = RMSNorm(dimensions: config.hiddenSize, eps: config.rmsNormEps)
        super.init()
    }

    func callAsFunction(_ inputs: MLXArray, cache: [KVCache]?) -> MLXArray {
        var h = embedTokens(inputs)
        // One mask per attention kind, built from the first cache of that kind.
        let firstLocal = layers.firstIndex { $0.isLocal }
        let firstGlobal = layers.firstIndex { !$0.isLocal }
        let localMask = firstLocal.map {
            createAttentionMask(h: h, cache: cache?[$0], windowSize: window)
        }
        let globalMask = firstGlobal.map { createAttentionMask(h: h, cache: cache?[$0]) }
        for (i, layer) in layers.enumerated() {
            let mask = (layer.isLocal ? localMask : globalMask) ?? .none
            h = layer(h, mask: mask, cache: cache?[i])
        }
        return norm(h)
    }
}

/// The dense baseline as an mlx-swift-lm language model (`model_type` "mobilellm_pro").
public final class MobileLLMProModel: Module, LLMModel {
    public let configuration: MobileLLMProConfiguration
    let model: MobileLLMProBackbone

    public init(_ configuration: MobileLLMProConfiguration) throws {
        self.configuration = configuration
        self.model = try MobileLLMProBackbone(configuration)
        super.init()
    }

    public func callAsFunction(_ inputs: MLXArray, cache: [KVCache]?) -> MLXArray {
        model.embedTokens.asLinear(model(inputs, cache: cache))
    }

    /// A rotating cache of `sliding_window` slots for each local layer, a growing
    /// one for each global layer (as dense.py's make_cache).
    public func newCache(parameters: GenerateParameters?) -> [KVCache] {
        model.layers.map { layer -> KVCache in
            layer.isLocal ? RotatingKVCache(maxSize: model.window) : KVCacheSimple()
        }
    }

    /// Drops an untied head, then stacks quantized q/k/v and gate/up as
    /// dense.py's fuse() does (and MobileMoEModel.sanitize).
    public func sanitize(weights: [String: MLXArray]) -> [String: MLXArray] {
        var weights = weights.filter { !$0.key.hasPrefix("lm_head.") }
        for (i, layer) in model.layers.enumerated() {
            let prefix = "model.layers.\(i)"
            layer.attention.fuseWeights(&weights, prefix: "\(prefix).self_attn")
            layer.mlp.fuseWeights(&weights, prefix: "\(prefix).mlp")
        }
        return weights
    }

    public var loraLayers: [Module] { model.layers }
}
