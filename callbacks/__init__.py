"""Callbacks for fedlit runs: plain objects whose methods are named after the engine's hooks.

See fedlit.engine for the hooks and their arguments; a callback implements only the ones it
needs and receives only the arguments its methods name.
"""
