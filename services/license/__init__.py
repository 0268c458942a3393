"""The licence service: answers "may card X run program P?" from a licence directory (DESIGN §5)."""
