// MobileMoE ("MobileMoE: Scaling On-Device Mixture of Experts", Meta, 2026) for
// mlx-swift-lm. Reads a directory written by the Python converter (convert.py)
// unchanged: the same safetensors names, the same config.json with its
// `quantization` block, and computes what mobilemoe_mlx/model/mobilemoe.py computes.
//
// Per layer: x += o_proj(attention(RMSNorm(x))); then with b = RMSNorm(x):
// router in float32, sigmoid scores, top-k by score + expert_bias, weights the
// unbiased scores of the chosen experts normalised to sum 1 and times
// routed_scaling_factor; x += sum_k w_k * expert_k(b) + shared_expert(b).
// The tied (quantized) embedding is the output head.
//
// Shape legend: B = batch, L = tokens, D = hidden, E = routed experts,
// K = experts chosen per token.

import Foundation
import MLX
import MLXLLM
import MLXLMCommon
import MLXNN

public struct MobileMoEConfiguration: Codable, Sendable {
    public var modelType: String
    public var vocabularySize: Int
    public var hiddenSize: Int
    /// Routed expert width.
    public var intermediateSize: Int
    /// Shared expert width (4x a routed expert).
    public var sharedIntermediateSize: Int
    public var hiddenLayers: Int
    public var attentionHeads: Int
    public var kvHeads: Int
    public var headDim: Int
    public var experts: Int
    public var expertsPerToken: Int
    public var routedScalingFactor: Float
    public var rmsNormEps: Float
    public var ropeTheta: Double
    /// Converted directories write the checkpoint's `rope_scaling` as `rope_parameters`.
    public var ropeParameters: RoPEParameters?
    public var ropeScaling: RoPEParameters?
    public var tieWordEmbeddings: Bool
    /// Stack quantized q/k/v and the shared expert's gate/up at load (model/mobilemoe.py's
    /// `fuse_projections`, default true).
    public var fuseProjections: Bool
    /// Sorted dispatch from this many (token, expert) pairs on: sorting pays
    /// off once many tokens hit each expert (prefill), not at decode.
    public var expertSortThreshold: Int

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type"
        case vocabularySize = "vocab_size"
        case hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size"
        case sharedIntermediateSize = "intermediate_size_mlp"
        case hiddenLayers = "num_hidden_layers"
        case attentionHeads = "num_attention_heads"
        case kvHeads = "num_key_value_heads"
        case headDim = "head_dim"
        case experts = "num_local_experts"
        case expertsPerToken = "num_experts_per_tok"
        case routedScalingFactor = "routed_scaling_factor"
        case rmsNormEps = "rms_norm_eps"
        case ropeTheta = "rope_theta"
        case ropeParameters = "rope_parameters"
        case ropeScaling = "rope_scaling"
        case tieWordEmbeddings = "tie_word_embeddings"
        case expertSortThreshold = "expert_sort_threshold"
        case fuseProjections = "fuse_projections"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? "mobilemoe"
        vocabularySize = try c.decode(Int.self, forKey: .vocabularySize)
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        sharedIntermediateSize = try c.decode(Int.self, forKey: .sharedIntermediateSize)
        hiddenLayers = try c.decode(Int.self, forKey: .hiddenLayers)
        attentionHeads = try c.decode(Int.self, forKey: .attentionHeads)
        kvHeads = try c.decode(Int.self, forKey: .kvHeads)
        headDim =
            try c.decodeIfPresent(Int.self, forKey: .headDim) ?? hiddenSize / attentionHeads
        experts = try c.decode(Int.self, forKey: .experts)
        expertsPerToken = try c.decode(Int.self, forKey: .expertsPerToken)
        routedScalingFactor =
            try c.decodeIfPresent(Float.self, forKey: .routedScalingFactor) ?? 2.5
        rmsNormEps = try c.decodeIfPresent(Float.self, forKey: .rmsNormEps) ?? 1e-5
        ropeParameters = try c.decodeIfPresent(RoPEParameters.self, forKey: .ropeParameters)
        ropeScaling = try c.decodeIfPresent(RoPEParameters.self, forKey: .ropeScaling)
        ropeTheta =
            try c.decodeIfPresent(Double.self, forKey: .ropeTheta)
            ?? ropeParameters?.ropeTheta ?? 500_000
        if let theta = ropeParameters?.ropeTheta, ropeScaling == nil {
            ropeTheta = theta
        }
        tieWordEmbeddings = try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? true
        expertSortThreshold =
            try c.decodeIfPresent(Int.self, forKey: .expertSortThreshold) ?? 64
        fuseProjections = try c.decodeIfPresent(Bool.self, forKey: .fuseProjections) ?? true
        guard tieWordEmbeddings else {
            throw MobileMoEError.unsupported(
                "tie_word_embeddings false (MobileMoE's embedding is its output head)")
        }
    }

    /// The llama3 block: `rope_scaling` when a source config is read directly,
    /// else the converted directory's `rope_parameters`.
    var ropeScalingBlock: RoPEParameters? { ropeScaling ?? ropeParameters }
}

// MARK: - Mixture of experts

/// The router: one float32 linear map [E, D], never quantized (routing is a
/// discrete choice that rounding would flip). Not Quantizable on purpose, so
/// the loader cannot swap it for a quantized layer.
final class Router: Module {
    let weight: MLXArray

    init(dimensions: Int, experts: Int) {
        self.weight = MLXArray.zeros([experts, dimensions])
        super.init()
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        matmul(x.asType(.float32), weight.asType(.float32).transposed())
    }
}

/// SwiGLU experts with gate and up fused in one [E, D, 2I] map, as stored.
final class RoutedExperts: Module {
    let sortThreshold: Int

    @ModuleInfo(key: "gate_up_proj") var gateUpProj: ExpertLinear
    @ModuleInfo(key: "down_proj") var downProj: ExpertLinear

    init(_ config: MobileMoEConfiguration) {
        let (d, i, e) = (config.hiddenSize, config.intermediateSize, config.experts)
        self.sortThreshold = config.expertSortThreshold
        self._gateUpProj.wrappedValue = ExpertLinear(
            inputDimensions: d, outputDimensions: 2 * i, experts: e)
        self._downProj.wrappedValue = ExpertLinear(
            inputDimensions: i, outputDimensions: d, experts: e)
        super.init()
    }

    /// x: [B, L, D], indices: [B, L, K] -> [B, L, K, D]
    func callAsFunction(_ x: MLXArray, _ indices: MLXArray) -> MLXArray {
        var x = expandedDimensions(x, axes: [-2, -3])  // [B, L, 1, 1, D]: one row per token
        let doSort = indices.size >= sortThreshold
        var idx = indices
        var inverseOrder: MLXArray? = nil
        if doSort {
            // Group the (token, expert) pairs by expert so each expert's weights
            // are read once, in order; undone after the down projection.
            let k = indices.dim(-1)
            let flat = indices.flattened()
            let order = argSort(flat, axis: -1)
            inverseOrder = argSort(order, axis: -1)
            x = x.flattened(start: 0, end: -3)[order.floorDivide(k)]
            idx = flat[order]
        }
        let gateUp = gateUpProj(x, idx, sortedIndices: doSort).split(parts: 2, axis: -1)
        var y = downProj(swiglu(gateUp[0], gateUp[1]), idx, sortedIndices: doSort)
        if let inverseOrder {
            y = unflatten(y[inverseOrder], axis: 0, shape: indices.shape)
        }
        return y.squeezed(axis: -2)
    }
}

/// The routing math as model/mobilemoe.py's compiled `select_experts` and
/// `combine_experts`: one traced function each, shared by every layer of a
/// model (same k and scaling), so their elementwise steps fuse and the host
/// replays a traced graph instead of building it operation by operation.
struct RoutingKernels {
    /// [router logits (float32) [.., E], expert bias [E]] -> [experts [.., K], weights [.., K]]
    let select: @Sendable ([MLXArray]) -> [MLXArray]
    /// (routed [B, L, K, D], weights [B, L, K], shared [B, L, D]) -> [B, L, D]
    let combine: @Sendable (MLXArray, MLXArray, MLXArray) -> MLXArray

    init(topK k: Int, scaling: Float) {
        select = compile { args in
            let scores = sigmoid(args[0])
            // The bias only chooses experts; the weights use the unbiased scores.
            let choice = scores + args[1]
            let indices = stopGradient(argPartition(-choice, kth: k - 1, axis: -1)[.ellipsis, ..<k])
            let weights = takeAlong(scores, indices, axis: -1)  // [B, L, K]
            return [indices, weights / (weights.sum(axis: -1, keepDims: true) + Float(1e-20)) * scaling]
        }
        combine = compile { routed, weights, shared in
            (routed * expandedDimensions(weights, axis: -1).asType(routed.dtype)).sum(axis: -2)
                + shared
        }
    }
}

final class MoEBlock: Module {
    let kernels: RoutingKernels
    /// Called with each forward pass's chosen experts [B, L, K] (parity tests
    /// and the benchmark's routing phase); nil in normal use.
    var expertObserver: ((MLXArray) -> Void)?

    let router: Router
    @ParameterInfo(key: "expert_bias") var expertBias: MLXArray
    let experts: RoutedExperts
    @ModuleInfo(key: "shared_expert") var sharedExpert: SwiGLU

    init(_ config: MobileMoEConfiguration, kernels: RoutingKernels) {
        self.kernels = kernels
        self.router = Router(dimensions: config.hiddenSize, experts: config.experts)
        self._expertBias.wrappedValue = MLXArray.zeros([config.experts], dtype: .float32)
        self.experts = RoutedExperts(config)
        self._sharedExpert.wrappedValue = SwiGLU(
            dimensions: config.hiddenSize, hiddenDimensions: config.sharedIntermediateSize)
        super.init()
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        let chosen = kernels.select([router(x), expertBias.asType(.float32)])
        let (indices, weights) = (chosen[0], chosen[1])
        expertObserver?(indices)
        return kernels.combine(experts(x, indices), weights, sharedExpert(x))
    }
}

// MARK: - The model

final class MoEDecoderLayer: Module {
    @ModuleInfo(key: "self_attn") var attention: Attention
    @ModuleInfo(key: "feed_forward") var feedForward: MoEBlock
    @ModuleInfo(key: "input_layernorm") var inputNorm: RMSNorm
    @ModuleInfo(key: "post_attention_layernorm") var postAttentionNorm: RMSNorm

    init(
        _ config: MobileMoEConfiguration, rope: InterleavedRoPE, units: UnitWeights,
        kernels: RoutingKernels
    ) {
        let shape = AttentionShape(
            hiddenSize: config.hiddenSize, heads: config.attentionHeads,
            kvHeads: config.kvHeads, headDim: config.headDim, eps: config.rmsNormEps)
        self._attention.wrappedValue = Attention(shape, rope: rope, units: units)
        self._feedForward.wrappedValue = MoEBlock(config, kernels: kernels)
        self._inputNorm.wrappedValue = RMSNorm(dimensions: config.hiddenSize, eps: config.rmsNormEps)
        self._postAttentionNorm.wrappedValue = RMSNorm(
            dimensions: config.hiddenSize, eps: config.rmsNormEps)
        super.init()
    }

    func callAsFunction(
        _ x: MLXArray, mask: MLXFast.ScaledDotProductAttentionMaskMode, cache: KVCache?
    ) -> MLXArray {
        let h = x + attention(inputNorm(x), mask: mask, cache: cache)
        return h + feedForward(postAttentionNorm(h))
    }
}

final class MobileMoEBackbone: Module {
    @ModuleInfo(key: "embed_tokens") var embedTokens: Embedding
    let layers: [MoEDecoderLayer]
    let norm: RMSNorm

    init(_ config: MobileMoEConfiguration) throws {
        let rope = try InterleavedRoPE(
            dimensions: config.headDim, theta: config.ropeTheta, scaling: config.ropeScalingBlock)
        self._embedTokens.wrappedValue = Embedding(
            embeddingCount: config.vocabularySize, dimensions: config.hiddenSize)
        let units = UnitWeights()
        let kernels = RoutingKernels(
            topK: config.expertsPerToken, scaling: config.routedScalingFactor)
        self.layers = (0 ..< config.hiddenLayers).map { _ in
            MoEDecoderLayer(config, rope: rope, units: units, kernels: kernels)
        }
        self.norm = RMSNorm(dimensions: config.hiddenSize, eps: config.rmsNormEps)
        super.init()
    }

    func callAsFunction(_ inputs: MLXArray, cache: [KVCache]?) -> MLXArray {
        var h = embedTokens(inputs)
        let mask = createAttentionMask(h: h, cache: cache?.first)
        for (i, layer) in layers.enumerated() {
            h = layer(h, mask: mask, cache: cache?[i])
        }
        return norm(h)
    }
}

/// MobileMoE as an mlx-swift-lm language model (`model_type` "mobilemoe").
public final class MobileMoEModel: Module, LLMModel, KVCacheDimensionProvider {
    public let configuration: MobileMoEConfiguration
    public let kvHeads: [Int]
    let model: MobileMoEBackbone

    public init(_ configuration: MobileMoEConfiguration) throws {
        self.configuration = configuration
        self.kvHeads = Array(repeating: configuration.kvHeads, count: configuration.hiddenLayers)
        self.model = try MobileMoEBackbone(configuration)
        super.init()
    }

    public func callAsFunction(_ inputs: MLXArray, cache: [KVCache]?) -> MLXArray {
        // Tied embeddings: the (possibly quantized) embedding is the output head.
        model.embedTokens.asLinear(model(inputs, cache: cache))
    }

    /// Converted directories already use this model's names; an untied head
    /// some exporters add is dropped (the embedding is the head). Then, unless
    /// `fuse_projections` is off, quantized q/k/v and shared-expert gate/up
    /// are stacked and the module tree set up to take them, as model/mobilemoe.py's
    /// sanitize (mlx-swift-lm's loadWeights calls this before it quantizes).
    public func sanitize(weights: [String: MLXArray]) -> [String: MLXArray] {
        var weights = weights.filter { !$0.key.hasPrefix("lm_head.") }
        if configuration.fuseProjections {
            for (i, layer) in model.layers.enumerated() {
                let prefix = "model.layers.\(i)"
                layer.attention.fuseWeights(&weights, prefix: "\(prefix).self_attn")
                layer.feedForward.sharedExpert.fuseWeights(
                    &weights, prefix: "\(prefix).feed_forward.shared_expert")
            }
        }
        return weights
    }

    public var loraLayers: [Module] { model.layers }

    /// Calls `observer(layer, indices [B, L, K])` with the experts every MoE layer
    /// chooses in each forward pass; nil stops observing.
    public func observeExperts(_ observer: ((Int, MLXArray) -> Void)?) {
        for (i, layer) in model.layers.enumerated() {
            if let observer {
                layer.feedForward.expertObserver = { indices in observer(i, indices) }
            } else {
                layer.feedForward.expertObserver = nil
            }
        }
    }
}
