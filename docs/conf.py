"""Sphinx configuration: MyST pages (the guides, the measured results, the generated configuration reference)
and an API reference from jaxtl's docstrings. Built in CI with warnings as errors:
`.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

project = "jaxtl"
author = "the jaxtl authors"
copyright = "2026, the jaxtl authors"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "make_config_reference.py"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Docstrings are written with `single backticks` for code, as the guides are.
default_role = "code"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # Flax's own (reStructuredText) docstrings stay Flax's
autodoc_default_options = {"members": True, "undoc-members": False}

html_theme = "furo"
html_title = "jaxtl"
html_static_path = ["_static"]
html_css_files = ["jaxtl.css"]


def _plain_docstring(app, what, name, obj, options, lines):
    """jaxtl's docstrings are plain text, not reStructuredText: `code` in single backticks, `name: meaning` entries
    whose continuation lines are indented, Markdown-style tables. Each paragraph is rendered as such: a table as a
    literal block, entries as a list, prose as prose, with `|` and `*` outside backticks meaning themselves."""

    def plain(part):
        return part.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_ ", "\\_ ")

    def escape(text):
        parts = text.split("`")
        if len(parts) % 2 == 0:  # an odd backtick: no code spans in this text
            return plain(text).replace("`", "\\`")
        return "".join(f"``{part}``" if i % 2 else plain(part) for i, part in enumerate(parts))

    out, paragraph = [], []

    def flush():
        if not paragraph:
            return
        if all(line.lstrip().startswith("|") for line in paragraph) or any(
                line.startswith(">>>") for line in paragraph):
            out.extend(["::", ""] + ["   " + line for line in paragraph] + [""])
        elif any(line.startswith("  ") for line in paragraph[1:]) and not paragraph[0].startswith(" "):
            entries = []
            for line in paragraph:
                if line.startswith(" ") and entries:
                    entries[-1] += " " + line.strip()
                else:
                    entries.append(line.strip())
            for entry in entries:
                out.append("- " + escape(entry.removeprefix("- ")))
            out.append("")
        else:
            out.extend([escape(" ".join(line.strip() for line in paragraph)), ""])
        paragraph.clear()

    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip())
        else:
            flush()
    flush()
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", _plain_docstring)
