// mobilemoe-bench: the MobileMoE benchmark on a Mac with mlx-swift.
//
//     mobilemoe-bench --model S=/path/to/S-converted --model pro=/path/to/pro-synthetic \
//         --out results-swift
//
// Each model directory needs its bench plan (bench_prompts.json, written by
// `python -m bench export-prompts` or `export-synthetic`). Writes
// OUT/results.json; `python -m bench report OUT` turns it into report.md.

import Foundation
import MobileMoEBench

let usage = """
    usage: mobilemoe-bench --model [NAME=]DIR [--model [NAME=]DIR ...] [--out DIR]
                           [--cache-limit-mb N] [--force]

      --model [NAME=]DIR   a model directory with bench_prompts.json; NAME (default: the
                           plan's name) pairs it with a Python run in `bench report --compare`
      --out DIR            where results.json goes [default: results-swift]
      --cache-limit-mb N   MLX buffer-cache limit in MB [default: MLX's]
      --force              replace an existing OUT/results.json
    """

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("error: \(message)\n".utf8))
    exit(2)
}

var models = [BenchModel]()
var out = "results-swift"
var cacheLimit: Int? = nil
var force = false
var args = CommandLine.arguments.dropFirst()
while let arg = args.popFirst() {
    switch arg {
    case "--model":
        guard let value = args.popFirst() else { fail("--model needs [NAME=]DIR") }
        let parts = value.split(separator: "=", maxSplits: 1).map(String.init)
        let (name, path) = parts.count == 2 ? (parts[0], parts[1]) : (nil, parts[0])
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory),
            isDirectory.boolValue
        else { fail("--model \(path): no such directory") }
        models.append(BenchModel(directory: URL(fileURLWithPath: path), name: name))
    case "--out":
        guard let value = args.popFirst() else { fail("--out needs a directory") }
        out = value
    case "--cache-limit-mb":
        guard let value = args.popFirst(), let mb = Int(value), mb >= 0 else {
            fail("--cache-limit-mb takes a whole number of megabytes")
        }
        cacheLimit = mb << 20
    case "--force":
        force = true
    case "-h", "--help":
        print(usage)
        exit(0)
    default:
        fail("unknown argument \(arg)\n\(usage)")
    }
}
if models.isEmpty { fail("name at least one --model DIR\n\(usage)") }

let outDirectory = URL(fileURLWithPath: out)
let resultsURL = outDirectory.appending(component: "results.json")
if FileManager.default.fileExists(atPath: resultsURL.path) && !force {
    fail("\(resultsURL.path) already exists; pass --force to replace it")
}
do {
    try FileManager.default.createDirectory(at: outDirectory, withIntermediateDirectories: true)
    let runner = try BenchmarkRunner(
        models: models, output: resultsURL, cacheLimit: cacheLimit,
        progress: { fraction, what in
            let line = "[\(Int(fraction * 100))%] \(what)\n"
            FileHandle.standardError.write(Data(line.utf8))
        })
    let results = try await runner.run()
    print("wrote \(resultsURL.path) (\(results.models.count) models)")
    print("next: python -m bench report \(out)")
} catch let error as BenchError {
    fail(error.localizedDescription)
} catch {
    FileHandle.standardError.write(Data("error: \(error.localizedDescription)\n".utf8))
    exit(1)
}
