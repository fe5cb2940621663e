"""Checkpoints: everything between files on disk (or on the Hub) and a model.

reading.py             the released checkpoints' files: safetensors, shards, PyTorch pickles
config.py              config.json: the keys, their checks, the presets
consistency.py         a checkpoint's files must agree (tokenizer ids, special tokens)
layout.py              the released tensor layouts and their names
packing.py             INT4 QAT values -> MLX's packed words, scales and biases, losslessly
tensor_converter.py    one tensor from its released form to the converted one
safetensors_writer.py  writing shards without holding the model in memory
output_dir.py          writing under a temporary name, renamed when complete
turns.py               where a turn ends: the tokenizer, and the tokens generation stops on
convert.py             the conversion: `convert()`
convert_cli.py         its command line (convert.py, mobilemoe-convert)
hub.py                 the Hugging Face Hub: downloads, the cache, clear failures
loading.py             `load()`: a converted directory, or a checkpoint converted once
synthetic_tokenizer.py the released tokenizer's protocol, with Llama 3.2's words or made-up ones
synthetic.py           random checkpoints in the released layouts (tests, demos, benchmarks)
"""
