// Shim over hiredis (apt: libhiredis-dev, pkg-config: hiredis).
//
// Only the Argv variants of the command functions are used from Swift, since
// Swift cannot call the variadic printf-style ones.
#ifndef WECHATRELAY_CHIREDIS_SHIM_H
#define WECHATRELAY_CHIREDIS_SHIM_H

#include <hiredis/hiredis.h>

#endif
