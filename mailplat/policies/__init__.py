"""The policy plugins shipped with mailplat, one module each; their factories are in
``mailplat.plugins.mailplat_policies``. See docs/plugins/."""
