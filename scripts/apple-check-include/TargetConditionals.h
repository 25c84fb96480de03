/* Stand-in for the Apple SDK header, used only by scripts/check-apple.sh so that C build
 * scripts (ring's) finish when wick is type-checked for aarch64-apple-darwin on Linux. Nothing
 * compiled against it is linked or run; a real Mac build uses the SDK's header. */
#pragma once
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_TV 0
#define TARGET_OS_SIMULATOR 0
#define TARGET_OS_EMBEDDED 0
#define TARGET_CPU_ARM64 1
