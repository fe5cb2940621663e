// Built by tests/test_swift_results.py with ios/Sources/MobileMoEBench/Results.swift
// and Plan.swift (Foundation only, no MLX): encodes a results.json whose
// numbers include NaN and both infinities with BenchResults' own encoder and
// prints it, so the test can read it the way `python -m bench report` does.

import Foundation

let oneExpert = RoutingLayer(distinct: 1, entropy: .nan, maxOverMean: .infinity)
let prompt = RoutingPrompt(
    layers: [oneExpert], meanDistinct: 1, meanEntropy: .nan, touchedExpertBytes: 4608,
    peakMemoryBytes: 1_000_000)
let decode = DecodeEntry(
    context: 16, contextFilled: 16, genTokens: 4, tokensPerS: Stats([10, 12]),
    stepS: Stats([0.1, 0.08]), graphBuildS: Stats([0.001, 0.001]),
    graphBuildFraction: -.infinity, graphBuildIdleS: nil, peakMemoryBytes: 1,
    fillS: 0.5, fillPeakMemoryBytes: 1, kvCacheBytes: 2, kvCacheBytesAnalytic: 2,
    rssBytes: nil, footprintBytes: nil)
let analytic: JSONValue = .object([
    "params": .object(["total": .int(100), "active": .int(50)]),
    "weight_bytes": .object(["total": .int(400), "decode_read_per_token": .int(200)]),
    "kv_bytes_per_token": .int(64),
])
let model = ModelRecord(
    name: "tiny", label: "tiny label", family: "moe", synthetic: true, source: "/tmp/tiny",
    config: .object(["vocab_size": .int(512)]), dtype: "float32",
    quant: .object(["bits": .int(4), "group_size": .int(32)]), analytic: analytic,
    memory: MemoryRecord(weightsBytes: 1, activeAfterLoadBytes: 1, rssBytes: nil),
    prefill: [], decode: [decode],
    routing: RoutingRecord(tokens: 16, prompts: ["real": prompt, "random": prompt, "repeat": prompt]),
    complete: true)
let results = BenchResults(
    schema: BenchResults.schemaName, schemaVersion: BenchResults.version,
    created: "2026-01-01T00:00:00Z", interrupted: false,
    machine: MachineInfo(
        chip: "cpu", cpu: nil, machine: "x86_64", os: "Linux", memoryBytes: 1, cpuCount: 2,
        mlx: "0.31.6 (mlx-swift)", mlxLm: "3.31.4 (mlx-swift-lm)", backend: "CPU",
        defaultDevice: "Device(cpu, 0)", deviceModel: "x86_64"),
    settings: .object([
        "dtype": .string("float32"), "bits": .int(4), "group_size": .int(32),
        "prompts": .string("real"), "prefill_step": .int(256), "warmup": .int(0),
        "repeats": .int(1), "gen_tokens": .int(4), "bandwidth_gbps": .null,
    ]),
    rssPeakBytes: 1, models: [model],
    runtime: RuntimeInfo(
        name: "mlx-swift", mlxSwift: "0.31.6", mlxSwiftLm: "3.31.4",
        buildConfiguration: "debug", cacheLimitBytes: 0, memoryLimitBytes: 0),
    footprintPeakBytes: nil)
FileHandle.standardOutput.write(try results.encodedJSON())
