"""Writes docs/config.md, the configuration reference, from jaxtl's key declarations (`jaxtl.config.KEYS`)."""

from pathlib import Path

from jaxtl.commands import config_reference

if __name__ == "__main__":
    path = Path(__file__).with_name("config.md")
    path.write_text(config_reference(), encoding="utf-8")
    print(path)
