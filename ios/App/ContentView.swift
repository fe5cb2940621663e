// The app's one screen: choose a model folder (one model, or a folder of model
// folders, each with its bench_prompts.json), run the benchmark, watch
// progress, read the medians, share results.json. The state and the run live
// in BenchViewModel.swift.

import MobileMoEBench
import SwiftUI
import UniformTypeIdentifiers

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
