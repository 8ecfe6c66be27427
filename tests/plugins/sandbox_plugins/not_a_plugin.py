"""A module in the plugins directory without any plugin class: reported, not fatal."""
VALUE = 1
