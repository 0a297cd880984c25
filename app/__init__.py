"""The Gradio demo of DualToken.

``models`` loads the checkpoints once into a registry, ``handlers`` holds one plain function per endpoint,
``ui`` lays out the five tabs (``build_demo``), ``cli`` parses flags and launches; ``make_examples`` writes the
example images and ``random_checkpoints`` random-weight checkpoints for tests and development.
"""
