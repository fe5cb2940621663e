// The bench plan: bench_prompts.json, written by `python -m bench export-prompts`
// (or export-synthetic) beside a model. It fixes the protocol (settings), the
// prompts as token ids, and the analytic figures of the model's results entry,
// so the Swift run measures exactly what `python -m bench run` measures.

import Foundation

/// Any JSON value, carried through unchanged (config, analytic, settings).
public enum JSONValue: Codable, Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let v = try? c.decode(Bool.self) {
            self = .bool(v)
        } else if let v = try? c.decode(Int.self) {
            self = .int(v)
        } else if let v = try? c.decode(Double.self) {
            self = .double(v)
        } else if let v = try? c.decode(String.self) {
            self = .string(v)
        } else if let v = try? c.decode([JSONValue].self) {
            self = .array(v)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let v): try c.encode(v)
        case .int(let v): try c.encode(v)
        case .double(let v): try c.encode(v)
        case .string(let v): try c.encode(v)
        case .array(let v): try c.encode(v)
        case .object(let v): try c.encode(v)
        }
    }

    public subscript(key: String) -> JSONValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    public var intValue: Int? {
        switch self {
        case .int(let v): v
        case .double(let v): Int(v)
        default: nil
        }
    }
}

/// bench/harness.py's Settings, as the plan records them.
public struct PlanSettings: Codable, Sendable, Equatable {
    public var promptLengths: [Int]
    public var decodeContexts: [Int]
    public var genTokens: Int
    public var repeats: Int
    public var warmup: Int
    public var prompts: String
    public var prefillStep: Int
    public var routingTokens: Int
    public var seed: Int

    enum CodingKeys: String, CodingKey {
        case promptLengths = "prompt_lengths"
        case decodeContexts = "decode_contexts"
        case genTokens = "gen_tokens"
        case repeats, warmup, prompts
        case prefillStep = "prefill_step"
        case routingTokens = "routing_tokens"
        case seed
    }
}

public struct BenchPlan: Decodable, Sendable {
    public static let format = "mobilemoe-bench/plan"
    public static let fileName = "bench_prompts.json"

    public var format: String
    public var version: Int
    public var name: String
    public var label: String
    public var family: String
    public var synthetic: Bool
    public var config: JSONValue
    public var dtype: String
    public var quant: JSONValue
    public var analytic: JSONValue
    /// Analytic KV bytes keyed by token count (string keys, as JSON has them).
    public var kvCacheBytesAnalytic: [String: Double]
    public var perExpertBytes: Int?
    /// The plan's settings as written (copied into results.json).
    public var rawSettings: JSONValue
    public var settings: PlanSettings
    /// kind (real, random, repeat) -> length -> token ids.
    public var prompts: [String: [String: [Int32]]]

    enum CodingKeys: String, CodingKey {
        case format, version, name, label, family, synthetic, config, dtype, quant, analytic
        case kvCacheBytesAnalytic = "kv_cache_bytes_analytic"
        case perExpertBytes = "per_expert_bytes"
        case settings, prompts
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        format = try c.decode(String.self, forKey: .format)
        version = try c.decode(Int.self, forKey: .version)
        name = try c.decode(String.self, forKey: .name)
        label = try c.decode(String.self, forKey: .label)
        family = try c.decode(String.self, forKey: .family)
        synthetic = try c.decode(Bool.self, forKey: .synthetic)
        config = try c.decode(JSONValue.self, forKey: .config)
        dtype = try c.decode(String.self, forKey: .dtype)
        quant = try c.decode(JSONValue.self, forKey: .quant)
        analytic = try c.decode(JSONValue.self, forKey: .analytic)
        kvCacheBytesAnalytic = try c.decode([String: Double].self, forKey: .kvCacheBytesAnalytic)
        perExpertBytes = try c.decodeIfPresent(Int.self, forKey: .perExpertBytes)
        rawSettings = try c.decode(JSONValue.self, forKey: .settings)
        settings = try c.decode(PlanSettings.self, forKey: .settings)
        prompts = try c.decode([String: [String: [Int32]]].self, forKey: .prompts)
    }

    /// Reads `directory/bench_prompts.json`, with a sentence saying what to do when absent.
    public static func load(modelDirectory directory: URL) throws -> BenchPlan {
        let url = directory.appending(component: fileName)
        guard let data = try? Data(contentsOf: url) else {
            throw BenchError.input(
                "\(directory.lastPathComponent) has no \(fileName): run `python -m bench "
                    + "export-prompts --model DIR` (or export-synthetic) and copy it in")
        }
        let plan = try JSONDecoder().decode(BenchPlan.self, from: data)
        guard plan.format == format, plan.version == 1 else {
            throw BenchError.input("\(url.path) is not a bench plan of format \(format) v1")
        }
        return plan
    }

    /// The `kind` prompt of `length` token ids, as the Python benchmark feeds it.
    public func tokens(_ kind: String, _ length: Int) throws -> [Int32] {
        guard let ids = prompts[kind]?[String(length)], ids.count == length else {
            throw BenchError.input(
                "the bench plan has no \(kind) prompt of \(length) tokens: export it again "
                    + "with the settings you run")
        }
        return ids
    }

    public func analyticKVBytes(_ tokens: Int) -> Double? {
        kvCacheBytesAnalytic[String(tokens)]
    }
}

public enum BenchError: LocalizedError {
    case input(String)

    public var errorDescription: String? {
        switch self {
        case .input(let message): message
        }
    }
}
