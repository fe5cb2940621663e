// Runs the benchmark over model directories (each with its bench plan) and
// writes results.json after every phase, so an interrupted run keeps what it
// measured. Shared by the macOS command (mobilemoe-bench) and the iOS app.

import Foundation
import MLX
import MLXLMCommon
import MobileMoE

public struct BenchModel: Sendable {
    /// The name results.json gives it (pairs it with a Python run's model of the
    /// same name in `bench report --compare`): the plan's name unless overridden.
    public var name: String?
    public var directory: URL

    public init(directory: URL, name: String? = nil) {
        self.directory = directory
        self.name = name
    }
}

public final class BenchmarkRunner {
    let models: [BenchModel]
    let output: URL
    let progress: ProgressHandler
    var results: BenchResults
    let plans: [BenchPlan]

    /// `output`: the results.json to write. `cacheLimit`: MLX's buffer-cache
    /// limit in bytes (nil: MLX's default); a phone wants a small one.
    public init(
        models: [BenchModel], output: URL, cacheLimit: Int? = nil,
        progress: @escaping ProgressHandler = { _, _ in }
    ) throws {
        guard !models.isEmpty else { throw BenchError.input("no model directory to run") }
        self.models = models
        self.output = output
        self.progress = progress
        if let cacheLimit { Memory.cacheLimit = cacheLimit }
        let plans = try models.map { try BenchPlan.load(modelDirectory: $0.directory) }
        for (plan, model) in zip(plans, models).dropFirst() where plan.settings != plans[0].settings {
            throw BenchError.input(
                "\(model.directory.lastPathComponent)'s bench plan has other settings than "
                    + "\(models[0].directory.lastPathComponent)'s: export both with the same options")
        }
        self.plans = plans
        let created = ISO8601DateFormatter.string(
            from: Date(), timeZone: .current, formatOptions: [.withInternetDateTime])
        self.results = BenchResults(
            schema: BenchResults.schemaName, schemaVersion: BenchResults.version,
            created: created, interrupted: false, machine: Machine.info(),
            settings: plans[0].rawSettings, rssPeakBytes: ProcessMemory.peakResidentBytes(),
            models: [], runtime: Machine.runtime(),
            footprintPeakBytes: ProcessMemory.footprint()?.peak)
    }

    func save() throws {
        results.rssPeakBytes = ProcessMemory.peakResidentBytes()
        results.footprintPeakBytes = ProcessMemory.footprint()?.peak
        try results.write(to: output)
    }

    /// Measures every model in turn. Cancelling the task stops after the
    /// current step; results.json then says "interrupted".
    @discardableResult
    public func run() async throws -> BenchResults {
        try save()
        let work = plans.map { workEstimate($0) }.reduce(0, +)
        var done = 0.0
        do {
            for (model, plan) in zip(models, plans) {
                let (loaded, _) = try await MobileMoERegistration.loadModel(
                    directory: model.directory)
                var record = ModelRecord(
                    name: model.name ?? plan.name, label: plan.label, family: plan.family,
                    synthetic: plan.synthetic, source: model.directory.path, config: plan.config,
                    dtype: plan.dtype, quant: plan.quant, analytic: plan.analytic, memory: nil,
                    prefill: [], decode: [], routing: nil, complete: nil)
                results.models.append(record)
                let index = results.models.count - 1
                // Each phase's figures are saved as soon as they are measured.
                record = try await Measurement(
                    model: loaded, plan: plan, label: plan.label,
                    update: { [self] r in
                        results.models[index] = r
                        try save()
                    },
                    progress: { [self] w, what in
                        done += w
                        progress(min(done / Swift.max(work, 1), 1), what)
                    }
                ).run(record)
                results.models[index] = record
                Memory.clearCache()
            }
        } catch is CancellationError {
            results.interrupted = true
        }
        try save()
        return results
    }

    /// Work in tokens, weighted as bench/harness.py's work_estimate.
    func workEstimate(_ plan: BenchPlan) -> Double {
        let s = plan.settings
        let runs = Double(s.warmup + s.repeats)
        var w = runs * Double(s.promptLengths.reduce(0, +))
        w += s.decodeContexts.map { Double($0) + runs * Double(s.genTokens * 8) }.reduce(0, +)
        if plan.family == "moe" { w += 3 * Double(s.routingTokens) }
        return w
    }
}
