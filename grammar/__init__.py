"""The `.surg` grammar, shipped inside the installed package as `surgery.grammar/surg.lark`."""
