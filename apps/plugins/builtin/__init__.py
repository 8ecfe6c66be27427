"""Built-in plugins. Like every plugin they run only in sandbox workers and are disabled until an
administrator enables them (Plugins > Plugins)."""
