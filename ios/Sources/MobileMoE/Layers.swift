// Layers shared by MobileMoE (MobileMoE.swift) and the dense baseline
// (MobileLLMPro.swift): attention with interleaved RoPE and weightless QK-norm,
// the SwiGLU feed-forward block, and the expert linears kept [E, in, out].
//
// They compute what mobilemoe_mlx/model.py computes (the Python port is the
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
        case factor
        case originalMaxPositionEmbeddings = "original_max_position_embeddings"
        case lowFreqFactor = "low_freq_factor"
        case highFreqFactor = "high_freq_factor"
        case ropeTheta = "rope_theta"
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

/// RMS normalisation over the last axis without a learned scale (QK-norm).
/// MLXFast.rmsNorm takes a weight; a ones weight of the input's dtype keeps
/// the result exact and the dtype unchanged.
func weightlessRMSNorm(_ x: MLXArray, eps: Float) -> MLXArray {
    MLXFast.rmsNorm(x, weight: MLXArray.ones([x.dim(-1)], dtype: x.dtype), eps: eps)
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

/// GQA attention: q/k/v projections without bias, interleaved RoPE, then the
/// weightless per-head RMS norm (it commutes with the rotation, the checkpoints
/// apply it after), softmax attention with scale 1/sqrt(head_dim).
final class Attention: Module {
    let heads: Int
    let kvHeads: Int
    let headDim: Int
    let eps: Float
    let scale: Float
    let rope: InterleavedRoPE

    @ModuleInfo(key: "q_proj") var qProj: Linear
    @ModuleInfo(key: "k_proj") var kProj: Linear
    @ModuleInfo(key: "v_proj") var vProj: Linear
    @ModuleInfo(key: "o_proj") var oProj: Linear

    init(_ shape: AttentionShape, rope: InterleavedRoPE) {
        self.heads = shape.heads
        self.kvHeads = shape.kvHeads
        self.headDim = shape.headDim
        self.eps = shape.eps
        self.scale = 1 / Float(shape.headDim).squareRoot()
        self.rope = rope
        let d = shape.hiddenSize
        self._qProj.wrappedValue = Linear(d, shape.heads * shape.headDim, bias: false)
        self._kProj.wrappedValue = Linear(d, shape.kvHeads * shape.headDim, bias: false)
        self._vProj.wrappedValue = Linear(d, shape.kvHeads * shape.headDim, bias: false)
        self._oProj.wrappedValue = Linear(shape.heads * shape.headDim, d, bias: false)
        super.init()
    }

    func callAsFunction(
        _ x: MLXArray, mask: MLXFast.ScaledDotProductAttentionMaskMode, cache: KVCache?
    ) -> MLXArray {
        let (b, l) = (x.dim(0), x.dim(1))
        var q = qProj(x).reshaped(b, l, heads, headDim).transposed(0, 2, 1, 3)
        var k = kProj(x).reshaped(b, l, kvHeads, headDim).transposed(0, 2, 1, 3)
        let v = vProj(x).reshaped(b, l, kvHeads, headDim).transposed(0, 2, 1, 3)

        let offset = cache?.offset ?? 0
        q = weightlessRMSNorm(rope(q, offset: offset), eps: eps)
        k = weightlessRMSNorm(rope(k, offset: offset), eps: eps)

        let out = attentionWithCacheUpdate(
            queries: q, keys: k, values: v, cache: cache, scale: scale, mask: mask)
        return oProj(out.transposed(0, 2, 1, 3).reshaped(b, l, heads * headDim))
    }
}

// MARK: - Feed-forward

/// SwiGLU: the always-on shared expert of MobileMoE and the dense model's MLP.
final class SwiGLU: Module, UnaryLayer {
    @ModuleInfo(key: "gate_proj") var gateProj: Linear
    @ModuleInfo(key: "up_proj") var upProj: Linear
    @ModuleInfo(key: "down_proj") var downProj: Linear

    init(dimensions: Int, hiddenDimensions: Int) {
        self._gateProj.wrappedValue = Linear(dimensions, hiddenDimensions, bias: false)
        self._upProj.wrappedValue = Linear(dimensions, hiddenDimensions, bias: false)
        self._downProj.wrappedValue = Linear(hiddenDimensions, dimensions, bias: false)
        super.init()
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        downProj(silu(gateProj(x)) * upProj(x))
    }
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
