// Host build only (csrc/host/): the stand-ins for <cuda_runtime.h>.
#pragma once
#include "host/cuda_host.h"
