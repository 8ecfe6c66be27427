raise RuntimeError("this plugin module explodes at import")
