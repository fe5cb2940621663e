// The measurements, phase by phase, as bench/harness.py takes them:
//
// - every phase starts from an emptied buffer cache and a reset peak, so each
//   recorded peak belongs to that phase alone;
// - prefill feeds all tokens but the last in chunks of `prefill_step`,
//   evaluating the cache after each chunk, then the last token, whose logits
//   give the first token (TTFT = all of that);
// - decode fills a cache to the context first (untimed), keeps a copy of it in
//   host memory (outside MLX's accounting), and for every repeat generates
//   `gen_tokens` greedy tokens from a fresh copy in the loop users run
//   (bench/steps.py, mlx-lm's generate_step): step i+1 is built and queued
//   with asyncEval before token i is read, so the host builds while the
//   device computes; the graph-building time of each step is kept apart, and
//   timed once more with nothing else running (probeStep);
// - warm-up runs first, then the timed repeats, all of them kept.

import Foundation
import MLX
import MLXLMCommon
import MobileMoE

func now() -> Double {
    Double(DispatchTime.now().uptimeNanoseconds) / 1e9
}

/// Forget earlier allocations so the next peak belongs to this phase only.
func startPhase() {
    Memory.clearCache()
    Memory.peakMemory = 0  // the setter resets the peak
}

/// Bytes of the caches' buffers (as allocated, in 256-token steps), like mlx-lm's nbytes.
func cacheBytes(_ cache: [KVCache]) -> Int {
    cache.reduce(0) { total, c in
        total + ((c as? BaseKVCache)?.innerState().reduce(0) { $0 + $1.nbytes } ?? 0)
    }
}

/// Feeds `tokens` into `cache` as mlx-lm does; returns the first new token [1].
func prefill(_ model: any LanguageModel, tokens: MLXArray, cache: [KVCache], step: Int) -> MLXArray
{
    let n = tokens.dim(0)
    var done = 0
    while n - done > 1 {
        let k = min(step, n - done - 1)
        _ = model(tokens[done ..< done + k].reshaped(1, k), cache: cache)
        eval(cache)
        done += k
    }
    let logits = model(tokens[done ..< n].reshaped(1, n - done), cache: cache)
    let y = argMax(logits[0..., logits.dim(1) - 1, 0...], axis: -1)
    eval(y)
    return y
}

/// One greedy decode step as mlx-lm's generate_step builds it (bench/steps.py's
/// `_step`): the model, the last position's log-probabilities, their argmax.
/// `y` is [1]; returns (token [1], log-probabilities [1, V]).
func decodeStep(_ model: any LanguageModel, _ y: MLXArray, cache: [KVCache])
    -> (token: MLXArray, logprobs: MLXArray)
{
    let logits = model(y.reshaped(1, 1), cache: cache)
    let last = logits[0..., logits.dim(1) - 1, 0...]
    let logprobs = last - last.logSumExp(axis: -1, keepDims: true)
    return (argMax(logprobs, axis: -1), logprobs)
}

/// `n` greedy tokens after `first` in bench/steps.py's pipelined loop: the
/// graph of step i+1 is built and handed to asyncEval before token i is read.
/// Returns (seconds for the n tokens, per-step host graph-building seconds).
func decode(_ model: any LanguageModel, first: MLXArray, cache: [KVCache], count n: Int)
    -> (total: Double, builds: [Double])
{
    var builds = [Double]()
    let t0 = now()
    var next = decodeStep(model, first, cache: cache)
    builds.append(now() - t0)
    asyncEval(next.token, next.logprobs)
    for i in 0 ..< n {
        let current = next
        if i + 1 < n {
            let tb = now()
            next = decodeStep(model, current.token, cache: cache)
            builds.append(now() - tb)
            asyncEval(next.token, next.logprobs)
        }
        _ = current.token.item(Int32.self)  // the token, as a user's loop reads it
    }
    return (now() - t0, builds)
}

/// bench/steps.py's probe_step: build `steps` decode steps with nothing else
/// running, each evaluated before the next is built; their build seconds.
func probeStep(_ model: any LanguageModel, first: MLXArray, cache: [KVCache], steps: Int = 8)
    -> [Double]
{
    var y = first
    var builds = [Double]()
    for _ in 0 ..< steps {
        let t = now()
        let out = decodeStep(model, y, cache: cache)
        builds.append(now() - t)
        eval(out.token, out.logprobs)
        y = out.token
    }
    return builds
}

/// A filled cache copied to host memory: the copy each decode repeat starts
/// from must not count in the decode phase's peak (as bench/harness.py's offload).
struct HostCache {
    struct Layer {
        let buffers: [MLXArray.MLXArrayData]
        let offset: Int
        let metaState: [String]
        let rotating: Bool
    }

    let layers: [Layer]

    init(_ cache: [KVCache]) {
        layers = cache.map { c in
            let buffers = (c as? BaseKVCache)?.innerState() ?? []
            return Layer(
                buffers: buffers.map { $0.asData(access: .copy) }, offset: c.offset,
                metaState: c.metaState, rotating: c is RotatingKVCache)
        }
    }

    /// Fresh, evaluated MLX caches (from `model.newCache`) holding the copy.
    func restore(into fresh: [KVCache]) -> [KVCache] {
        for (c, layer) in zip(fresh, layers) where !layer.buffers.isEmpty {
            guard let base = c as? BaseKVCache else { continue }
            base.state = layer.buffers.map { MLXArray(data: $0) }
            if layer.rotating {
                base.metaState = layer.metaState  // offset and write index
            } else {
                base.offset = layer.offset  // the buffers run past the offset
            }
        }
        eval(fresh)
        return fresh
    }
}

/// Distinct experts per layer and how evenly they were used, from recorded choices.
func routingLayers(_ choices: [[Int32]], experts: Int) -> [RoutingLayer] {
    choices.map { ids in
        var counts = [Int](repeating: 0, count: experts)
        for i in ids where Int(i) < experts { counts[Int(i)] += 1 }
        let total = Double(max(counts.reduce(0, +), 1))
        var entropy = 0.0
        for c in counts where c > 0 {
            let p = Double(c) / total
            entropy -= p * log(p)
        }
        let mean = Double(counts.reduce(0, +)) / Double(experts)
        return RoutingLayer(
            distinct: counts.filter { $0 > 0 }.count, entropy: entropy / log(Double(experts)),
            maxOverMean: Double(counts.max() ?? 0) / max(mean, 1e-12))
    }
}

/// Reports progress: fraction done (0...1) and what runs now.
public typealias ProgressHandler = @Sendable (Double, String) -> Void
