"""The validator: raw:{exchange} -> valid:{exchange}, rejected events as alerts on mdp:alerts."""

from services.validator.service import Validator

__all__ = ["Validator"]
