"""The ``phivault`` command. One module per command group; ``main`` assembles them."""
