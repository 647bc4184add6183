"""Model supply: built-in models pulled from PyPI, what ``model=`` names, and the conversion cache.

Turns a name into an artifact the runtime can run, calling the converters through one function
(``cache.cached_artifact``)."""
