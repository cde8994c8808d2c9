"""mmdit-convert's library side: find a source's components, write them as Orbax, export them back."""
from mmdit_jax.convert.export import export
from mmdit_jax.convert.to_orbax import convert

__all__ = ["convert", "export"]
