"""Mirror aesthetic.computer moods from MongoDB into ATProto PDS repos."""

__version__ = "0.1.0"
