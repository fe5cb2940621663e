// results.json in bench/schema.py's schema ("mobilemoe-bench/results" v2), so
// `python -m bench report DIR` and `--compare` read a Swift run beside a Python
// one. Fields beyond the schema (runtime, device model, process footprint) are
// extra keys the report ignores. tests/test_swift_sources.py checks these
// field names against bench/schema.py, extracted from this file's syntax tree.

import Foundation

public struct Stats: Codable, Sendable {
    public var median: Double
    public var min: Double
    public var max: Double
    public var runs: [Double]

    /// median (the mean of the middle two for an even count, as Python's
    /// statistics.median), min, max and every run.
    public init(_ runs: [Double]) {
        let s = runs.sorted()
        let mid = s.count / 2
        self.median = s.isEmpty ? 0 : (s.count % 2 == 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2)
        self.min = s.first ?? 0
        self.max = s.last ?? 0
        self.runs = runs
    }
}

public struct PrefillEntry: Codable, Sendable {
    public var promptTokens: Int
    public var ttftS: Stats
    public var tokensPerS: Stats
    public var peakMemoryBytes: Int
    public var kvCacheBytes: Int
    public var kvCacheBytesAnalytic: Double?
    public var rssBytes: Int?
    public var footprintBytes: Int?

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens"
        case ttftS = "ttft_s"
        case tokensPerS = "tokens_per_s"
        case peakMemoryBytes = "peak_memory_bytes"
        case kvCacheBytes = "kv_cache_bytes"
        case kvCacheBytesAnalytic = "kv_cache_bytes_analytic"
        case rssBytes = "rss_bytes"
        case footprintBytes = "footprint_bytes"
    }
}

public struct DecodeEntry: Codable, Sendable {
    public var context: Int
    public var contextFilled: Int
    public var genTokens: Int
    public var tokensPerS: Stats
    public var stepS: Stats
    public var graphBuildS: Stats
    public var graphBuildFraction: Double
    /// Build seconds of steps built with nothing else running (harness.py's probe).
    public var graphBuildIdleS: Stats?
    public var peakMemoryBytes: Int
    public var fillS: Double
    public var fillPeakMemoryBytes: Int
    public var kvCacheBytes: Int
    public var kvCacheBytesAnalytic: Double?
    public var rssBytes: Int?
    public var footprintBytes: Int?

    enum CodingKeys: String, CodingKey {
        case context
        case contextFilled = "context_filled"
        case genTokens = "gen_tokens"
        case tokensPerS = "tokens_per_s"
        case stepS = "step_s"
        case graphBuildS = "graph_build_s"
        case graphBuildFraction = "graph_build_fraction"
        case graphBuildIdleS = "graph_build_idle_s"
        case peakMemoryBytes = "peak_memory_bytes"
        case fillS = "fill_s"
        case fillPeakMemoryBytes = "fill_peak_memory_bytes"
        case kvCacheBytes = "kv_cache_bytes"
        case kvCacheBytesAnalytic = "kv_cache_bytes_analytic"
        case rssBytes = "rss_bytes"
        case footprintBytes = "footprint_bytes"
    }
}

public struct MemoryRecord: Codable, Sendable {
    public var weightsBytes: Int
    public var activeAfterLoadBytes: Int
    public var rssBytes: Int?
    public var footprintBytes: Int?

    enum CodingKeys: String, CodingKey {
        case weightsBytes = "weights_bytes"
        case activeAfterLoadBytes = "active_after_load_bytes"
        case rssBytes = "rss_bytes"
        case footprintBytes = "footprint_bytes"
    }
}

public struct RoutingLayer: Codable, Sendable {
    public var distinct: Int
    public var entropy: Double
    public var maxOverMean: Double

    enum CodingKeys: String, CodingKey {
        case distinct, entropy
        case maxOverMean = "max_over_mean"
    }
}

public struct RoutingPrompt: Codable, Sendable {
    public var layers: [RoutingLayer]
    public var meanDistinct: Double
    public var meanEntropy: Double
    public var touchedExpertBytes: Int
    public var peakMemoryBytes: Int

    enum CodingKeys: String, CodingKey {
        case layers
        case meanDistinct = "mean_distinct"
        case meanEntropy = "mean_entropy"
        case touchedExpertBytes = "touched_expert_bytes"
        case peakMemoryBytes = "peak_memory_bytes"
    }
}

public struct RoutingRecord: Codable, Sendable {
    public var tokens: Int
    public var prompts: [String: RoutingPrompt]
    public var realMinusRepeatPeakBytes: Int?
    public var realMinusRepeatTouchedBytes: Int?

    enum CodingKeys: String, CodingKey {
        case tokens, prompts
        case realMinusRepeatPeakBytes = "real_minus_repeat_peak_bytes"
        case realMinusRepeatTouchedBytes = "real_minus_repeat_touched_bytes"
    }
}

public struct ModelRecord: Codable, Sendable {
    public var name: String
    public var label: String
    public var family: String
    public var synthetic: Bool
    public var source: String
    public var config: JSONValue
    public var dtype: String
    public var quant: JSONValue
    public var analytic: JSONValue
    public var memory: MemoryRecord?
    public var prefill: [PrefillEntry]
    public var decode: [DecodeEntry]
    public var routing: RoutingRecord?
    public var complete: Bool?
}

public struct MachineInfo: Codable, Sendable {
    public var chip: String
    public var cpu: String?
    public var machine: String
    public var os: String
    public var memoryBytes: Int
    public var cpuCount: Int
    public var mlx: String
    public var mlxLm: String
    public var backend: String
    public var defaultDevice: String
    public var deviceModel: String

    enum CodingKeys: String, CodingKey {
        case chip, cpu, machine, os
        case memoryBytes = "memory_bytes"
        case cpuCount = "cpu_count"
        case mlx
        case mlxLm = "mlx_lm"
        case backend
        case defaultDevice = "default_device"
        case deviceModel = "device_model"
    }
}

/// What ran the benchmark: a Swift build against mlx-swift / mlx-swift-lm.
public struct RuntimeInfo: Codable, Sendable {
    public var name: String
    public var mlxSwift: String
    public var mlxSwiftLm: String
    public var buildConfiguration: String
    public var cacheLimitBytes: Int
    public var memoryLimitBytes: Int

    enum CodingKeys: String, CodingKey {
        case name
        case mlxSwift = "mlx_swift"
        case mlxSwiftLm = "mlx_swift_lm"
        case buildConfiguration = "build_configuration"
        case cacheLimitBytes = "cache_limit_bytes"
        case memoryLimitBytes = "memory_limit_bytes"
    }
}

public struct BenchResults: Codable, Sendable {
    public static let schemaName = "mobilemoe-bench/results"
    public static let version = 2

    public var schema: String
    public var schemaVersion: Int
    public var created: String
    public var interrupted: Bool
    public var machine: MachineInfo
    public var settings: JSONValue
    public var rssPeakBytes: Int
    public var models: [ModelRecord]
    public var runtime: RuntimeInfo
    /// Peak physical footprint of the process (what iOS's memory limit counts).
    public var footprintPeakBytes: Int?

    enum CodingKeys: String, CodingKey {
        case schema
        case schemaVersion = "schema_version"
        case created, interrupted, machine, settings
        case rssPeakBytes = "rss_peak_bytes"
        case models, runtime
        case footprintPeakBytes = "footprint_peak_bytes"
    }

    /// Written whole under a temporary name, then renamed over `url`.
    public func write(to url: URL) throws {
        try encodedJSON().write(to: url, options: .atomic)
    }

    /// The JSON text, non-finite numbers written as Python's json.dumps writes
    /// them (bench/run.py): the bare tokens NaN, Infinity and -Infinity, which
    /// Python's json.loads reads back (e.g. a routing entropy over one expert is
    /// 0/0). JSONEncoder cannot write bare tokens and by default refuses
    /// non-finite numbers, which would lose the whole file; so they are encoded
    /// as marker strings and the quoted markers replaced by the tokens.
    public func encodedJSON() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let tokens = ["NaN", "Infinity", "-Infinity"]
        let marker = { (token: String) in "mobilemoe-bench-nonfinite:\(token)" }
        encoder.nonConformingFloatEncodingStrategy = .convertToString(
            positiveInfinity: marker("Infinity"), negativeInfinity: marker("-Infinity"),
            nan: marker("NaN"))
        var text = String(decoding: try encoder.encode(self), as: UTF8.self)
        for token in tokens {
            text = text.replacingOccurrences(of: "\"\(marker(token))\"", with: token)
        }
        return Data(text.utf8)
    }
}
