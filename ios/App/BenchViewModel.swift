// The app's state and the benchmark run behind ContentView: the chosen model
// folders, progress, and the results. Foundation, Combine and MobileMoEBench
// only (no SwiftUI), so it can be type-checked apart from the app.

import Combine
import Foundation
import MobileMoEBench

@MainActor
final class BenchViewModel: ObservableObject {
    @Published var folder: URL?
    @Published var models: [URL] = []
    @Published var fraction = 0.0
    @Published var status = "Choose a model folder copied in through Finder."
    @Published var results: BenchResults?
    @Published var resultsURL: URL?
    @Published var running = false
    @Published var cacheLimitMB = 256
    private var task: Task<Void, Never>?

    /// A folder with bench_prompts.json is one model; otherwise its subfolders
    /// that have one are the models, in name order.
    func choose(_ url: URL) {
        _ = url.startAccessingSecurityScopedResource()
        folder = url
        let fm = FileManager.default
        if fm.fileExists(atPath: url.appending(component: BenchPlan.fileName).path) {
            models = [url]
        } else {
            let children =
                (try? fm.contentsOfDirectory(at: url, includingPropertiesForKeys: nil)) ?? []
            models = children.filter {
                fm.fileExists(atPath: $0.appending(component: BenchPlan.fileName).path)
            }.sorted { $0.lastPathComponent < $1.lastPathComponent }
        }
        status =
            models.isEmpty
            ? "\(url.lastPathComponent) holds no model with a bench_prompts.json."
            : "Models: " + models.map(\.lastPathComponent).joined(separator: ", ")
    }

    func run() {
        guard !models.isEmpty, !running else { return }
        let documents = FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
        let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(
            of: ":", with: "-")
        let outDir = documents.appending(component: "results-\(stamp)")
        let output = outDir.appending(component: "results.json")
        let models = self.models.map { BenchModel(directory: $0) }
        let cacheLimit = cacheLimitMB << 20
        running = true
        results = nil
        resultsURL = nil
        // Swift 6: every closure that runs off the main actor captures self
        // weakly in its own capture list (a nested closure must not reuse an
        // outer closure's weak `self`, a captured variable), and touches it
        // only on the main actor.
        let report: ProgressHandler = { [weak self] fraction, what in
            Task { @MainActor [weak self] in
                self?.fraction = fraction
                self?.status = what
            }
        }
        task = Task.detached(priority: .userInitiated) { [weak self] in
            let outcome: Result<BenchResults, Error>
            do {
                try FileManager.default.createDirectory(
                    at: outDir, withIntermediateDirectories: true)
                let runner = try BenchmarkRunner(
                    models: models, output: output, cacheLimit: cacheLimit, progress: report)
                outcome = .success(try await runner.run())
            } catch {
                outcome = .failure(error)
            }
            await self?.finish(outcome, output: output)
        }
    }

    private func finish(_ outcome: Result<BenchResults, Error>, output: URL) {
        switch outcome {
        case .success(let results):
            self.results = results
            resultsURL = output
            status = results.interrupted ? "Stopped: partial results." : "Done."
        case .failure(let error):
            status = "Error: \(error.localizedDescription)"
        }
        running = false
    }

    func stop() {
        task?.cancel()
    }
}
