"""Plugin package scanned by ``twisted.plugin.getPlugins`` for mailplat extensions.

Third-party packages add modules to ``mailplat/plugins/`` (a namespace-free drop-in directory,
like ``twisted/plugins``) that define objects providing the interfaces in
``mailplat.interfaces``.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
