// One model's entry in results.json, phase by phase (bench/harness.py's
// measure_model): memory after load, prefill at every prompt length, decode at
// every context, and for MoE models the real-vs-dummy routing phase.

import Foundation
import MLX
import MLXLMCommon
import MobileMoE

struct Measurement {
    let model: any LanguageModel
    let plan: BenchPlan
    let label: String
    /// Saves the entry as it stands (called after every phase).
    let update: (ModelRecord) throws -> Void
    /// Work done (tokens, weighted as the Python harness weighs them) and what.
    let progress: (Double, String) -> Void

    var settings: PlanSettings { plan.settings }

    func tokens(_ kind: String, _ n: Int) throws -> MLXArray {
        MLXArray(try plan.tokens(kind, n))
    }

    func run(_ start: ModelRecord) async throws -> ModelRecord {
        var record = start
        let weights = model.parameters().flattened().reduce(0) { $0 + $1.1.nbytes }
        record.memory = MemoryRecord(
            weightsBytes: weights, activeAfterLoadBytes: Memory.activeMemory,
            rssBytes: ProcessMemory.residentBytes(), footprintBytes: ProcessMemory.footprint()?.current)
        try update(record)
        let runs = settings.warmup + settings.repeats

        for p in settings.promptLengths {
            let toks = try tokens(settings.prompts, p)
            var ttft = [Double](), peaks = [Int](), kv = 0
            for r in 0 ..< runs {
                try Task.checkCancellation()
                let cache = model.newCache(parameters: nil)
                startPhase()
                let t = now()
                _ = prefill(model, tokens: toks, cache: cache, step: settings.prefillStep)
                let dt = now() - t
                if r >= settings.warmup {
                    ttft.append(dt)
                    peaks.append(Memory.peakMemory)
                }
                kv = cacheBytes(cache)
                progress(Double(p), "\(label): prefill \(p) (\(r + 1)/\(runs))")
            }
            record.prefill.append(
                PrefillEntry(
                    promptTokens: p, ttftS: Stats(ttft), tokensPerS: Stats(ttft.map { Double(p) / $0 }),
                    peakMemoryBytes: peaks.max() ?? 0, kvCacheBytes: kv,
                    kvCacheBytesAnalytic: plan.analyticKVBytes(p),
                    rssBytes: ProcessMemory.residentBytes(),
                    footprintBytes: ProcessMemory.footprint()?.current))
            try update(record)
        }

        for c in settings.decodeContexts {
            let toks = try tokens(settings.prompts, c)
            var cache = model.newCache(parameters: nil)
            startPhase()
            let t = now()
            let y = prefill(model, tokens: toks, cache: cache, step: settings.prefillStep)
            let fillS = now() - t
            let fillPeak = Memory.peakMemory
            let filled = cache.first?.offset ?? 0
            let kv = cacheBytes(cache)
            let host = HostCache(cache)  // host memory: not part of the decode peak
            cache = []
            progress(Double(c), "\(label): fill cache to \(c)")
            let idleBuilds = probeStep(
                model, first: y, cache: host.restore(into: model.newCache(parameters: nil)))
            var tps = [Double](), stepMeans = [Double](), buildMedians = [Double](),
                peaks = [Int]()
            for r in 0 ..< runs {
                try Task.checkCancellation()
                let runCache = host.restore(into: model.newCache(parameters: nil))
                startPhase()
                let (total, builds) = decode(
                    model, first: y, cache: runCache, count: settings.genTokens)
                if r >= settings.warmup {
                    tps.append(Double(settings.genTokens) / total)
                    // Steps overlap in the pipelined loop: the mean step, as harness.py.
                    stepMeans.append(total / Double(settings.genTokens))
                    buildMedians.append(Stats(builds).median)
                    peaks.append(Memory.peakMemory)
                }
                progress(
                    Double(settings.genTokens * 8), "\(label): decode at \(c) (\(r + 1)/\(runs))")
            }
            let stepMedian = Stats(stepMeans).median
            record.decode.append(
                DecodeEntry(
                    context: c, contextFilled: filled, genTokens: settings.genTokens,
                    tokensPerS: Stats(tps), stepS: Stats(stepMeans),
                    graphBuildS: Stats(buildMedians),
                    graphBuildFraction: stepMedian > 0 ? Stats(buildMedians).median / stepMedian : 0,
                    graphBuildIdleS: Stats(idleBuilds),
                    peakMemoryBytes: peaks.max() ?? 0, fillS: fillS, fillPeakMemoryBytes: fillPeak,
                    kvCacheBytes: kv, kvCacheBytesAnalytic: plan.analyticKVBytes(filled),
                    rssBytes: ProcessMemory.residentBytes(),
                    footprintBytes: ProcessMemory.footprint()?.current))
            try update(record)
        }

        if plan.family == "moe", settings.routingTokens > 0, let moe = model as? MobileMoEModel {
            record.routing = try await routing(moe, record: record)
        }
        record.complete = true
        try update(record)
        return record
    }

    /// Prefill real, random and repeated-token prompts, recording the experts
    /// every layer chose: how many distinct experts each prompt kind touches.
    func routing(_ moe: MobileMoEModel, record: ModelRecord) async throws -> RoutingRecord {
        let n = settings.routingTokens
        let layers = moe.configuration.hiddenLayers
        let experts = moe.configuration.experts
        var routing = RoutingRecord(tokens: n, prompts: [:])
        for kind in ["real", "random", "repeat"] {
            try Task.checkCancellation()
            var chosen = [[MLXArray]](repeating: [], count: layers)
            moe.observeExperts { layer, indices in chosen[layer].append(indices) }
            defer { moe.observeExperts(nil) }
            let cache = moe.newCache(parameters: nil)
            startPhase()
            _ = prefill(moe, tokens: try tokens(kind, n), cache: cache, step: settings.prefillStep)
            let peak = Memory.peakMemory
            moe.observeExperts(nil)
            let ids = chosen.map { calls in calls.flatMap { $0.asType(.int32).asArray(Int32.self) } }
            let perLayer = routingLayers(ids, experts: experts)
            let distinct = perLayer.map { $0.distinct }
            routing.prompts[kind] = RoutingPrompt(
                layers: perLayer,
                meanDistinct: Double(distinct.reduce(0, +)) / Double(max(layers, 1)),
                meanEntropy: perLayer.map { $0.entropy }.reduce(0, +) / Double(max(layers, 1)),
                touchedExpertBytes: distinct.reduce(0, +) * (plan.perExpertBytes ?? 0),
                peakMemoryBytes: peak)
            var partial = record
            partial.routing = routing
            try update(partial)
            progress(Double(n), "\(label): routing, \(kind) prompt")
        }
        if let real = routing.prompts["real"], let repeated = routing.prompts["repeat"] {
            routing.realMinusRepeatPeakBytes = real.peakMemoryBytes - repeated.peakMemoryBytes
            routing.realMinusRepeatTouchedBytes =
                real.touchedExpertBytes - repeated.touchedExpertBytes
        }
        return routing
    }
}
