################################################################################
#
# python-pytun
#
################################################################################

PYTHON_PYTUN_VERSION = 2.4.1
PYTHON_PYTUN_SITE = https://files.pythonhosted.org/packages/b3/74/4fecb3eeb2de2e672db6eca5088afa63541f0abeaaef5b7c6549f430c084
PYTHON_PYTUN_SETUP_TYPE = setuptools
PYTHON_PYTUN_LICENSE = MIT
PYTHON_PYTUN_LICENSE_FILES = LICENSE

$(eval $(python-package))
