"""The terminal: ``duogen chat``, the renderables (images as half-blocks, sixel, kitty), and the one
event renderer that ``duogen run`` and ``duogen chat`` share."""
