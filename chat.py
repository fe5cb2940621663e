"""Chat with a MobileMoE model in the terminal (`mobilemoe-chat` once installed).

    python chat.py --model S                       # facebook/MobileMoE-S-QAT
    python chat.py --model mlx/MobileMoE-S --prompt "Name three prime numbers."

The command itself lives in mobilemoe_mlx/chat/cli.py; `python chat.py -h` lists its options.
"""

from mobilemoe_mlx.chat.cli import main

if __name__ == "__main__":
    main()
