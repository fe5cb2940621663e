"""The terminal chat, from the command line down to one streamed answer.

cli.py       the command line (chat.py, mobilemoe-chat): options in, models loaded, terminal run
terminal.py  reading lines and Ctrl-C, answers to stdout, the rest to stderr
commands.py  /reset, /system, /stats and /help
session.py   the conversation (`ChatSession`): messages, template, context, one turn
stream.py    one answer streamed through mlx-lm, and the switch Ctrl-C pulls
cache.py     the KV caches kept across turns and the tokens they hold
options.py   every setting, and the checks that need no model
loader.py    which checkpoint --model means, and loading it for a chat

`mobilemoe_mlx.chat` was the conversation module before the package had
folders; its names still resolve here, with a warning naming session.py.
"""


def __getattr__(name):
    import importlib

    if name.startswith("__") or name == "session":  # a submodule being imported
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    session = importlib.import_module(f"{__name__}.session")
    if not hasattr(session, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    warnings.warn(f"mobilemoe_mlx.chat.{name} has moved to mobilemoe_mlx.chat.session.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(session, name)
