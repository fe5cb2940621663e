// Layers shared by MobileMoE (MobileMoE.swift) and the dense baseline
// (MobileLLMPro.swift): attention with interleaved RoPE and weightless QK-norm,
// the SwiGLU feed-forward block, and the expert linears kept [E, in, out].
//
// They compute what mobilemoe_mlx/model/mobilemoe.py computes (the Python port is the
// reference; tests/test_swift_sources.py checks the parameter names and
// Tests/MobileMoETests checks the numbers against a Python fixture).

import Foundation
import MLX
import MLXLMCommon
import MLXNN

// MARK: - RoPE

/// The `rope_parameters` (converted directories) or `rope_scaling` (source
/// checkpoints) block of a config.
public struct RoPEParameters: Codable, Sendable {
    public var ropeType: String?
    public var factor: Double?
    public var originalMaxPositionEmbeddings: Double?
    public var lowFreqFactor: Double?
    public var highFreqFactor: Double?
    public var ropeTheta: Double?

    enum CodingKeys: String, CodingKey {
        case ropeType = "rope_type"
        case legacyType = "type"
        case factor
        case originalMaxPositionEmbeddings = "original_max_position_embeddings"
        case lowFreqFactor = "low_freq_factor"
        case highFreqFactor = "high_freq_factor"
        case ropeTheta = "rope_theta"
    }

    public init(
        ropeType: String?, factor: Double? = nil, originalMaxPositionEmbeddings: Double? = nil,
        lowFreqFactor: Double? = nil, highFreqFactor: Double? = nil, ropeTheta: Double? = nil
    ) {
        self.ropeType = ropeType
        self.factor = factor
        self.originalMaxPositionEmbeddings = originalMaxPositionEmbeddings
        self.lowFreqFactor = lowFreqFactor
        self.highFreqFactor = highFreqFactor
        self.ropeTheta = ropeTheta
    }

    /// Older configs name the scaling kind `type` instead of `rope_type`;
    /// mlx-lm (and mobilemoe_mlx/checkpoints/config.py) accept either, `rope_type` first.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        ropeType =
            try c.decodeIfPresent(String.self, forKey: .ropeType)
            ?? c.decodeIfPresent(String.self, forKey: .legacyType)
        factor = try c.decodeIfPresent(Double.self, forKey: .factor)
        originalMaxPositionEmbeddings = try c.decodeIfPresent(
            Double.self, forKey: .originalMaxPositionEmbeddings)
        lowFreqFactor = try c.decodeIfPresent(Double.self, forKey: .lowFreqFactor)
        highFreqFactor = try c.decodeIfPresent(Double.self, forKey: .highFreqFactor)
        ropeTheta = try c.decodeIfPresent(Double.self, forKey: .ropeTheta)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeIfPresent(ropeType, forKey: .ropeType)
        try c.encodeIfPresent(factor, forKey: .factor)
        try c.encodeIfPresent(originalMaxPositionEmbeddings, forKey: .originalMaxPositionEmbeddings)
        try c.encodeIfPresent(lowFreqFactor, forKey: .lowFreqFactor)
        try c.encodeIfPresent(highFreqFactor, forKey: .highFreqFactor)
        try c.encodeIfPresent(ropeTheta, forKey: .ropeTheta)
    }
}

/// Rotary embedding of interleaved pairs (2i, 2i+1): MLX's `traditional` RoPE.
/// A plain struct, not a Module: its periods are no parameters to load.
struct InterleavedRoPE {
    let dimensions: Int
    let base: Float?
    /// Per pair, the period base^(2i/d) after llama3 scaling (MLX's `freqs`);
    /// nil for unscaled RoPE, which MLX computes from `base`.
    let periods: MLXArray?

    init(dimensions: Int, theta: Double, scaling: RoPEParameters?) throws {
        self.dimensions = dimensions
        let type = scaling?.ropeType ?? "default"
        switch type {
        case "default":
            self.base = Float(theta)
            self.periods = nil
        case "llama3":
            self.base = nil
            self.periods = MLXArray(
                llama3Periods(dimensions: dimensions, theta: theta, scaling: scaling!).map {
                    Float($0)
                })
        default:
            throw MobileMoEError.unsupported(
                "rope type '\(type)' (MobileMoE uses llama3 or unscaled RoPE)")
        }
    }

    func callAsFunction(_ x: MLXArray, offset: Int) -> MLXArray {
        MLXFast.RoPE(
            x, dimensions: dimensions, traditional: true, base: base, scale: 1.0,
            offset: offset, freqs: periods)
    }
}

/// llama3 frequency scaling as mlx-lm's Llama3RoPE computes it: periods whose
/// wavelength exceeds original/low_freq_factor are stretched by `factor`, those
/// between the two wavelength bounds are interpolated. With equal low and high
/// factors (MobileMoE's) nothing lies in between, so the smoothing term (a 0/0
/// there) is never used.
func llama3Periods(dimensions: Int, theta: Double, scaling: RoPEParameters) -> [Double] {
    let factor = scaling.factor ?? 1.0
    let low = scaling.lowFreqFactor ?? 1.0
    let high = scaling.highFreqFactor ?? 4.0
    let original = scaling.originalMaxPositionEmbeddings ?? 8192.0
    let lowWavelength = original / low
    let highWavelength = original / high
    return stride(from: 0, to: dimensions, by: 2).map { i in
        let period = Foundation.pow(theta, Double(i) / Double(dimensions))
        let wavelength = 2 * Double.pi * period
        if wavelength > lowWavelength {
            return period * factor
        }
        if wavelength > highWavelength && wavelength < lowWavelength {
            let smooth = (original / wavelength - low) / (high - low)
            return period / ((1 - smooth) / factor + smooth)
        }
        return period
    }
}

/// The unit weights of the weightless QK-norm: MLXFast.rmsNorm takes a weight
/// (mlx-swift has no `weight: nil` as Python's mx.fast.rms_norm), so it gets a
/// ones vector of the input's dtype (a float32 one would promote float16
/// activations). Made once per dtype and width and shared by every attention
/// layer of a model, not per call: a fresh `ones` per call would add graph
/// nodes to every layer of every decode step. Not a parameter (no MLXArray
/// property of a Module), so loading and the parameter names ignore it.
final class UnitWeights: @unchecked Sendable {
    private var cache = [String: MLXArray]()
    private let lock = NSLock()

    func callAsFunction(_ dimensions: Int, dtype: DType) -> MLXArray {
        let key = "\(dtype)-\(dimensions)"
        lock.lock()
        defer { lock.unlock() }
        if let w = cache[key] { return w }
        let w = MLXArray.ones([dimensions], dtype: dtype)
        eval(w)
        cache[key] = w
        return w
    }
}

/// RMS normalisation over the last axis without a learned scale (QK-norm):
/// the unit weight keeps the result exact and the dtype unchanged.
func weightlessRMSNorm(_ x: MLXArray, eps: Float, units: UnitWeights) -> MLXArray {
    MLXFast.rmsNorm(x, weight: units(x.dim(-1), dtype: x.dtype), eps: eps)
}

// MARK: - Fusion at load

/// A module whose projections `partKeys` (Linear, no bias) can run as one
/// stacked linear `fusedKey`, as mobilemoe_mlx/model/mobilemoe.py's _Fusable: at load,
/// when all parts are quantized with the same packing, their packed words,
/// scales and biases are stacked along the output rows (quantization groups
/// run along the input, so every product is exactly that of the separate
/// matmuls) and one matmul replaces two or three. Float weights stay separate
/// (a wider float matmul may sum in another order), as do mixed packings. A
/// directory saved fused (mlx-lm re-saving a loaded model) loads fused.
protocol FusableProjections: Module {
    static var fusedKey: String { get }
    static var partKeys: [String] { get }
    /// The separate projections, while not fused.
    var parts: [Linear] { get }
    var isFused: Bool { get }
}

extension FusableProjections {
    /// Loading: stack this module's tensors in `weights` (in place) when all are
    /// quantized alike, and swap in one (float, to be quantized by the loader)
    /// linear for the parts. `prefix` is this module's parameter path.
    func fuseWeights(_ weights: inout [String: MLXArray], prefix: String) {
        guard !isFused else { return }
        let fused = "\(prefix).\(Self.fusedKey)"
        if weights["\(fused).weight"] == nil {
            let names = Self.partKeys.map { "\(prefix).\($0)" }
            guard names.allSatisfy({ weights["\($0).scales"] != nil }) else { return }
            // Same bits and group size (widths of words and scales) or no fusion.
            let packings = Set(
                names.map { n -> String in
                    let (w, sc) = (weights["\(n).weight"]!, weights["\(n).scales"]!)
                    return "\(w.shape.dropFirst()) \(sc.shape.dropFirst()) \(sc.dtype)"
                })
            guard packings.count == 1 else { return }
            for r in ["weight", "scales", "biases"] where weights["\(names[0]).\(r)"] != nil {
                weights["\(fused).\(r)"] = concatenated(
                    names.map { weights.removeValue(forKey: "\($0).\(r)")! }, axis: 0)
            }
        }
        let linears = parts
        let outputs = linears.reduce(0) { $0 + $1.weight.dim(0) }
        var children: [String: NestedItem<String, Module>] = [
            Self.fusedKey: .value(Linear(linears[0].weight.dim(1), outputs, bias: false))
        ]
        for key in Self.partKeys {
            children[key] = NestedItem<String, Module>.none
        }
        update(modules: ModuleChildren(values: children))
    }
}

// MARK: - Attention

/// The attention shapes both models share.
struct AttentionShape {
    let hiddenSize: Int
    let heads: Int
    let kvHeads: Int
    let headDim: Int
    let eps: Float
}

/// GQA attention: q/k/v projections without bias (one stacked qkv_proj once
/// fused), interleaved RoPE, then the weightless per-head RMS norm (it
/// commutes with the rotation, the checkpoints apply it after), softmax
/// attention with scale 1/sqrt(head_dim).
final class Attention: Module, FusableProjections {
    static let fusedKey = "qkv_proj"
    static let partKeys = ["q_proj", "k_proj", "v_proj"]

    let heads: Int
    let kvHeads: Int
    let headDim: Int
    let eps: Float
    let scale: Float
    let rope: InterleavedRoPE
    let units: UnitWeights

    @ModuleInfo(key: "q_proj") var qProj: Linear?
    @ModuleInfo(key: "k_proj") var kProj: Linear?
    @ModuleInfo(key: "v_proj") var vProj: Linear?
    @ModuleInfo(key: "qkv_proj") var qkvProj: Linear?
    @ModuleInfo(key: "o_proj") var oProj: Linear

    init(_ shape: AttentionShape, rope: InterleavedRoPE, units: UnitWeights) {
        self.heads = shape.heads
        self.kvHeads = shape.kvHeads
        self.headDim = shape.headDim
        self.eps = shape.eps
        self.scale = 1 / Float(shape.headDim).squareRoot()
        self.rope = rope
        self.units = units
        let d = shape.hiddenSize
        self._qProj.wrappedValue = Linear(d, shape.heads * shape.headDim, bias: false)
        self._kProj.wrappedValue = Linear(d, shape.kvHeads * shape.headDim, bias: false)
        self._vProj.wrappedValue = Linear(d, shape.kvHeads * shape.headDim, bias: false)
        self._qkvProj.wrappedValue = nil
        self._oProj.wrappedValue = Linear(shape.heads * shape.headDim, d, bias: false)
        super.init()
    }

    var parts: [Linear] { [qProj, kProj, vProj].compactMap { $0 } }
    var isFused: Bool { qkvProj != nil }

    func callAsFunction(
        _ x: MLXArray, mask: MLXFast.ScaledDotProductAttentionMaskMode, cache: KVCache?
    ) -> MLXArray {
        let (b, l) = (x.dim(0), x.dim(1))
        let offset = cache?.offset ?? 0
        let q: MLXArray
        let k: MLXArray
        let v: MLXArray
        if let qkvProj {
            // One matmul, then q and k heads rotated and normalised together
            // (both per head and per position: one RoPE and one RMS-norm for
            // both, the same values as two of each), as model/mobilemoe.py does.
            let qkv = qkvProj(x).reshaped(b, l, heads + 2 * kvHeads, headDim)
                .transposed(0, 2, 1, 3)
            let qkAndV = qkv.split(indices: [heads + kvHeads], axis: 1)
            let qk = weightlessRMSNorm(rope(qkAndV[0], offset: offset), eps: eps, units: units)
                .split(indices: [heads], axis: 1)
            (q, k, v) = (qk[0], qk[1], qkAndV[1])
        } else {
            let qs = qProj!(x).reshaped(b, l, heads, headDim).transposed(0, 2, 1, 3)
            let ks = kProj!(x).reshaped(b, l, kvHeads, headDim).transposed(0, 2, 1, 3)
            v = vProj!(x).reshaped(b, l, kvHeads, headDim).transposed(0, 2, 1, 3)
            q = weightlessRMSNorm(rope(qs, offset: offset), eps: eps, units: units)
            k = weightlessRMSNorm(rope(ks, offset: offset), eps: eps, units: units)
        }

        let out = attentionWithCacheUpdate(
            queries: q, keys: k, values: v, cache: cache, scale: scale, mask: mask)
        return oProj(out.transposed(0, 2, 1, 3).reshaped(b, l, heads * headDim))
    }
}

// MARK: - Feed-forward

/// SwiGLU: the always-on shared expert of MobileMoE and the dense model's MLP
/// (gate and up one stacked gate_up_proj once fused).
final class SwiGLU: Module, UnaryLayer, FusableProjections {
    static let fusedKey = "gate_up_proj"
    static let partKeys = ["gate_proj", "up_proj"]

    @ModuleInfo(key: "gate_proj") var gateProj: Linear?
    @ModuleInfo(key: "up_proj") var upProj: Linear?
    @ModuleInfo(key: "gate_up_proj") var gateUpProj: Linear?
    @ModuleInfo(key: "down_proj") var downProj: Linear

    init(dimensions: Int, hiddenDimensions: Int) {
        self._gateProj.wrappedValue = Linear(dimensions, hiddenDimensions, bias: false)
        self._upProj.wrappedValue = Linear(dimensions, hiddenDimensions, bias: false)
        self._gateUpProj.wrappedValue = nil
        self._downProj.wrappedValue = Linear(hiddenDimensions, dimensions, bias: false)
        super.init()
    }

    var parts: [Linear] { [gateProj, upProj].compactMap { $0 } }
    var isFused: Bool { gateUpProj != nil }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        if let gateUpProj {
            let gateUp = gateUpProj(x).split(parts: 2, axis: -1)
            return downProj(swiglu(gateUp[0], gateUp[1]))
        }
        return downProj(swiglu(gateProj!(x), upProj!(x)))
    }
}

/// silu(gate) * up as one compiled function, as mlx-lm's `swiglu` (which
/// model/mobilemoe.py uses): its elementwise steps run as one kernel and the host
/// replays one traced graph instead of building three operations.
let swiglu: @Sendable (MLXArray, MLXArray) -> MLXArray = compile(shapeless: true) { gate, up in
    silu(gate) * up
}

// MARK: - Experts

/// E stacked linear maps stored [E, in, out], applied per token by expert index.
/// The checkpoints keep experts in this layout with quantization groups along
/// `out`, which is what gatherQuantizedMM(transpose: false) consumes: the
/// weights are never transposed. mlx-swift-lm's loader swaps this module for
/// QuantizedExpertLinear when the weights carry `scales` (Quantizable).
class ExpertLinear: Module, Quantizable {
    let weight: MLXArray

    init(weight: MLXArray) {
        self.weight = weight
        super.init()
    }

    convenience init(inputDimensions: Int, outputDimensions: Int, experts: Int) {
        self.init(weight: MLXArray.zeros([experts, inputDimensions, outputDimensions]))
    }

    func callAsFunction(_ x: MLXArray, _ indices: MLXArray, sortedIndices: Bool) -> MLXArray {
        gatherMM(x, weight, rhsIndices: indices, sortedIndices: sortedIndices)
    }

    func toQuantized(groupSize: Int, bits: Int, mode: QuantizationMode) -> Module {
        let (experts, inputDimensions, outputDimensions) = weight.shape3
        return QuantizedExpertLinear(
            experts: experts, inputDimensions: inputDimensions,
            outputDimensions: outputDimensions, groupSize: groupSize, bits: bits, mode: mode)
    }
}

/// ExpertLinear with affine-quantized weights: uint32 words [E, in, out*bits/32],
/// scales and biases [E, in, out/groupSize] (filled by the loader).
final class QuantizedExpertLinear: ExpertLinear, Quantized {
    let groupSize: Int
    let bits: Int
    let mode: QuantizationMode
    let scales: MLXArray
    let biases: MLXArray

    init(
        experts: Int, inputDimensions: Int, outputDimensions: Int, groupSize: Int, bits: Int,
        mode: QuantizationMode
    ) {
        self.groupSize = groupSize
        self.bits = bits
        self.mode = mode
        let groups = [experts, inputDimensions, outputDimensions / groupSize]
        self.scales = MLXArray.zeros(groups)
        self.biases = MLXArray.zeros(groups)
        super.init(
            weight: MLXArray.zeros(
                [experts, inputDimensions, outputDimensions * bits / 32], dtype: .uint32))
    }

    override func callAsFunction(_ x: MLXArray, _ indices: MLXArray, sortedIndices: Bool)
        -> MLXArray
    {
        gatherQuantizedMM(
            x, weight, scales: scales, biases: biases, rhsIndices: indices, transpose: false,
            groupSize: groupSize, bits: bits, mode: mode, sortedIndices: sortedIndices)
    }
}

// MARK: - Errors

public enum MobileMoEError: LocalizedError {
    case unsupported(String)
    case badModelDirectory(String)

    public var errorDescription: String? {
        switch self {
        case .unsupported(let what): "unsupported configuration: \(what)"
        case .badModelDirectory(let what): what
        }
    }
}
