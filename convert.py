"""Convert a released MobileMoE checkpoint into an MLX directory (`mobilemoe-convert`
once installed).

    python convert.py facebook/MobileMoE-S-QAT --out mlx/MobileMoE-S

The command itself lives in mobilemoe_mlx/checkpoints/convert_cli.py; `python convert.py -h` lists its options.
"""

from mobilemoe_mlx.checkpoints.convert_cli import main

if __name__ == "__main__":
    main()
