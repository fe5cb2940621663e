// The app's one screen: choose a model folder (one model, or a folder of model
// folders, each with its bench_prompts.json), run the benchmark, watch
// progress, read the medians, share results.json.

import MobileMoEBench
import SwiftUI
import UniformTypeIdentifiers

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
        task = Task.detached(priority: .userInitiated) { [weak self] in
            do {
                try FileManager.default.createDirectory(
                    at: outDir, withIntermediateDirectories: true)
                let runner = try BenchmarkRunner(
                    models: models, output: output, cacheLimit: cacheLimit,
                    progress: { fraction, what in
                        Task { @MainActor in
                            self?.fraction = fraction
                            self?.status = what
                        }
                    })
                let results = try await runner.run()
                await MainActor.run {
                    self?.results = results
                    self?.resultsURL = output
                    self?.status = results.interrupted ? "Stopped: partial results." : "Done."
                }
            } catch {
                await MainActor.run { self?.status = "Error: \(error.localizedDescription)" }
            }
            await MainActor.run { self?.running = false }
        }
    }

    func stop() {
        task?.cancel()
    }
}

struct ContentView: View {
    @StateObject private var model = BenchViewModel()
    @State private var choosing = false

    var body: some View {
        NavigationStack {
            List {
                Section("Models") {
                    Button(model.folder?.lastPathComponent ?? "Choose model folder") {
                        choosing = true
                    }
                    .disabled(model.running)
                    Stepper(
                        "MLX cache limit: \(model.cacheLimitMB) MB", value: $model.cacheLimitMB,
                        in: 0 ... 4096, step: 128
                    )
                    .disabled(model.running)
                }
                Section("Run") {
                    if model.running {
                        ProgressView(value: model.fraction)
                        Button("Stop", role: .destructive) { model.stop() }
                    } else {
                        Button("Run benchmark") { model.run() }
                            .disabled(model.models.isEmpty)
                    }
                    Text(model.status).font(.footnote).foregroundStyle(.secondary)
                }
                if let results = model.results {
                    ResultsSection(results: results)
                }
                if let url = model.resultsURL {
                    Section {
                        ShareLink("Share results.json", item: url)
                    }
                }
            }
            .navigationTitle("MobileMoE Bench")
            .fileImporter(isPresented: $choosing, allowedContentTypes: [.folder]) { result in
                if case .success(let url) = result { model.choose(url) }
            }
        }
    }
}

struct ResultsSection: View {
    let results: BenchResults

    var body: some View {
        ForEach(results.models, id: \.name) { m in
            Section(m.label) {
                ForEach(m.prefill, id: \.promptTokens) { e in
                    row(
                        "prefill \(e.promptTokens)",
                        String(format: "%.1f tok/s, TTFT %.3f s", e.tokensPerS.median, e.ttftS.median),
                        e.peakMemoryBytes)
                }
                ForEach(m.decode, id: \.context) { e in
                    row(
                        "decode at \(e.context)", String(format: "%.1f tok/s", e.tokensPerS.median),
                        e.peakMemoryBytes)
                }
            }
        }
        if let peak = results.footprintPeakBytes {
            Section("Process") {
                Text("Peak footprint \(ByteCountFormatter.string(fromByteCount: Int64(peak), countStyle: .memory))")
            }
        }
    }

    func row(_ what: String, _ speed: String, _ peak: Int) -> some View {
        VStack(alignment: .leading) {
            Text(what).font(.headline)
            Text(speed)
            Text("peak \(ByteCountFormatter.string(fromByteCount: Int64(peak), countStyle: .memory))")
                .font(.footnote).foregroundStyle(.secondary)
        }
    }
}
