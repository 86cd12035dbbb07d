#include <pmix.h>
#include <pmix_server.h>
