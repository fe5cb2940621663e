// Parity with the Python model: `python -m bench export-parity --out DIR` writes
// a tiny converted MobileMoE (DIR/model), token ids, the Python model's float32
// logits and the experts it chose in every layer (DIR/parity.safetensors).
// The Swift model must give cosine >= 0.9999 at every position and choose the
// same experts in every layer for every token.
//
//     MOBILEMOE_PARITY_FIXTURE=DIR xcodebuild test -scheme MobileMoE-Package \
//         -destination 'platform=macOS'

import Foundation
import MLX
import MLXLMCommon
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

    func testLogitsAndExpertChoicesMatchPython() async throws {
        let dir = try fixture()
        let expected = try loadArrays(url: dir.appending(component: "parity.safetensors"))
        let (loaded, _) = try await MobileMoERegistration.loadModel(
            directory: dir.appending(component: "model"))
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
            XCTAssertGreaterThanOrEqual(cosine, 0.9999, "cosine at position \(position)")
        }

        let layers = model.configuration.hiddenLayers
        XCTAssertEqual(chosen.count, layers, "every MoE layer reports its experts")
        for layer in 0 ..< layers {
            let want = try XCTUnwrap(expected["experts.\(layer)"])  // [T, K], sorted rows
            let got = try XCTUnwrap(chosen[layer])
            // argPartition leaves the top k in no particular order: compare sorted rows.
            let gotSorted = sorted(got.reshaped(want.shape).asType(.int32), axis: -1)
            XCTAssertEqual(
                gotSorted.asArray(Int32.self), want.asType(.int32).asArray(Int32.self),
                "experts chosen in layer \(layer)")
        }
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
