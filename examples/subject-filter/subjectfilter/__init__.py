"""An example mailplat policy plugin: refuse messages by Subject."""
