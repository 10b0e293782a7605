"""Reference networks built from plain nn.Conv2d (see issue 3)."""
