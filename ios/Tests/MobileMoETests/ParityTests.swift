// Parity with the Python model: `python -m bench export-parity --out DIR` writes
// a tiny converted MobileMoE (DIR/model: INT4 weights, float32 otherwise, with
// q/k/v and the shared expert's gate/up stored apart), the same model saved as
// Python loads it (DIR/model-fused: those stacked on disk), token ids, the
// Python model's float32 logits and the experts it chose in every layer
// (DIR/parity.safetensors). The Swift model must give cosine >= 0.9999 at every
// position and choose the same experts in every layer for every token, from
// either directory, fused at load as in Python.
//
//     MOBILEMOE_PARITY_FIXTURE=DIR swift test          (Linux, CPU)
//     MOBILEMOE_PARITY_FIXTURE=DIR xcodebuild test -scheme MobileMoE-Package \
//         -destination 'platform=macOS'

import Foundation
import MLX
import MLXLMCommon
import MLXNN
import XCTest

@testable import MobileMoE

final class ParityTests: XCTestCase {
    func fixture() throws -> URL {
        guard let path = ProcessInfo.processInfo.environment["MOBILEMOE_PARITY_FIXTURE"] else {
            throw XCTSkip(
                "set MOBILEMOE_PARITY_FIXTURE to a directory written by "
                    + "`python -m bench export-parity --out DIR`")
        }
        return URL(fileURLWithPath: path)
    }

    /// Loads `directory` of the fixture and checks its logits and experts
    /// against Python's; returns the model.
    @discardableResult
    func checkParity(directory: String) async throws -> MobileMoEModel {
        let dir = try fixture()
        let expected = try loadArrays(url: dir.appending(component: "parity.safetensors"))
        let (loaded, _) = try await MobileMoERegistration.loadModel(
            directory: dir.appending(component: directory))
        let model = try XCTUnwrap(loaded as? MobileMoEModel)

        var chosen = [Int: MLXArray]()
        model.observeExperts { layer, indices in chosen[layer] = indices }
        let tokens = try XCTUnwrap(expected["tokens"])  // [1, T] int32
        let logits = model(tokens, cache: nil).asType(.float32)  // [1, T, V]
        model.observeExperts(nil)
        eval(logits)

        let reference = try XCTUnwrap(expected["logits"]).asType(.float32)
        XCTAssertEqual(logits.shape, reference.shape)
        // Cosine per position over the vocabulary.
        let dot = (logits * reference).sum(axis: -1)
        let norms = sqrt((logits * logits).sum(axis: -1) * (reference * reference).sum(axis: -1))
        let cosines = (dot / norms).asArray(Float.self)
        for (position, cosine) in cosines.enumerated() {
            XCTAssertGreaterThanOrEqual(cosine, 0.9999, "\(directory): cosine at \(position)")
        }
        print("\(directory): \(cosines.count) positions, min cosine \(cosines.min() ?? .nan)")

        let layers = model.configuration.hiddenLayers
        XCTAssertEqual(chosen.count, layers, "every MoE layer reports its experts")
        for layer in 0 ..< layers {
            let want = try XCTUnwrap(expected["experts.\(layer)"])  // [T, K], sorted rows
            let got = try XCTUnwrap(chosen[layer])
            // argPartition leaves the top k in no particular order: compare sorted rows.
            let gotSorted = sorted(got.reshaped(want.shape).asType(.int32), axis: -1)
            XCTAssertEqual(
                gotSorted.asArray(Int32.self), want.asType(.int32).asArray(Int32.self),
                "\(directory): experts chosen in layer \(layer)")
        }
        return model
    }

    func testLogitsAndExpertChoicesMatchPython() async throws {
        let model = try await checkParity(directory: "model")
        // Quantized q/k/v and shared gate/up are stacked at load, as in model/mobilemoe.py.
        for layer in model.model.layers {
            XCTAssertTrue(layer.attention.isFused)
            XCTAssertTrue(layer.feedForward.sharedExpert.isFused)
            XCTAssertTrue(layer.attention.qkvProj is QuantizedLinear)
        }
    }

    func testDirectorySavedFusedLoadsAndMatchesPython() async throws {
        let model = try await checkParity(directory: "model-fused")
        for layer in model.model.layers {
            XCTAssertTrue(layer.attention.isFused)
            XCTAssertTrue(layer.feedForward.sharedExpert.isFused)
        }
    }

    func testUnfusedLoadGivesTheSameExpertsAndLogits() async throws {
        // fuse_projections false: separate quantized q/k/v, the same numbers.
        let dir = try fixture().appending(component: "model")
        var config = try JSONSerialization.jsonObject(
            with: Data(contentsOf: dir.appending(component: "config.json"))) as! [String: Any]
        config["fuse_projections"] = false
        let copy = FileManager.default.temporaryDirectory.appending(
            component: "mobilemoe-unfused-\(ProcessInfo.processInfo.processIdentifier)")
        try? FileManager.default.removeItem(at: copy)
        try FileManager.default.createDirectory(at: copy, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: copy) }
        try JSONSerialization.data(withJSONObject: config).write(
            to: copy.appending(component: "config.json"))
        try FileManager.default.copyItem(
            at: dir.appending(component: "model.safetensors"),
            to: copy.appending(component: "model.safetensors"))
        let (fusedModel, _) = try await MobileMoERegistration.loadModel(directory: dir)
        let (unfusedModel, _) = try await MobileMoERegistration.loadModel(directory: copy)
        let unfused = try XCTUnwrap(unfusedModel as? MobileMoEModel)
        XCTAssertFalse(unfused.model.layers[0].attention.isFused)
        let tokens = try XCTUnwrap(
            loadArrays(url: try fixture().appending(component: "parity.safetensors"))["tokens"])
        let a = fusedModel(tokens, cache: nil)
        let b = unfused(tokens, cache: nil)
        XCTAssertEqual(abs(a - b).max().item(Float.self), 0, "fusion changes no value")
    }

    func testQKNormUnitWeightIsMadeOncePerDtype() {
        let units = UnitWeights()
        let a = units(16, dtype: .float32)
        XCTAssertTrue(a === units(16, dtype: .float32), "cached, not made per call")
        let h = units(16, dtype: .float16)
        XCTAssertEqual(h.dtype, .float16)
        XCTAssertFalse(a === h)
        let x = MLXRandom.normal([2, 4, 16]).asType(.float16)
        XCTAssertEqual(weightlessRMSNorm(x, eps: 1e-5, units: units).dtype, .float16)
    }

    func testRoPEScalingTypeIsReadAsRopeType() throws {
        // Older configs write "type" (mlx-lm and mobilemoe_mlx/checkpoints/config.py accept it).
        let legacy = try JSONDecoder().decode(
            RoPEParameters.self,
            from: Data(#"{"type": "llama3", "factor": 16.0, "original_max_position_embeddings": 64}"#.utf8))
        XCTAssertEqual(legacy.ropeType, "llama3")
        let both = try JSONDecoder().decode(
            RoPEParameters.self, from: Data(#"{"rope_type": "default", "type": "llama3"}"#.utf8))
        XCTAssertEqual(both.ropeType, "default", "rope_type wins, as in mlx-lm")
        let rope = try InterleavedRoPE(dimensions: 16, theta: 500_000, scaling: legacy)
        XCTAssertNotNil(rope.periods, "llama3 periods, not unscaled RoPE")
    }

    func testConfigurationReadsConvertedRoPEParameters() throws {
        let json = """
            {"model_type": "mobilemoe", "vocab_size": 512, "hidden_size": 64,
             "intermediate_size": 32, "intermediate_size_mlp": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "num_local_experts": 8, "num_experts_per_tok": 2, "routed_scaling_factor": 2.5,
             "rope_parameters": {"rope_type": "llama3", "factor": 16.0,
               "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
               "high_freq_factor": 1.0, "rope_theta": 500000.0}}
            """
        let config = try JSONDecoder().decode(
            MobileMoEConfiguration.self, from: Data(json.utf8))
        XCTAssertEqual(config.ropeTheta, 500_000)
        let periods = llama3Periods(
            dimensions: 16, theta: config.ropeTheta, scaling: try XCTUnwrap(config.ropeScalingBlock))
        // Wavelengths above 64 are stretched by 16, the others kept.
        for (i, period) in periods.enumerated() {
            let plain = Foundation.pow(500_000.0, Double(2 * i) / 16)
            XCTAssertEqual(period, 2 * Double.pi * plain > 64 ? plain * 16 : plain, accuracy: 1e-9)
        }
    }
}
