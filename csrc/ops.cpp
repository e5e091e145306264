// The operator schemas: what mmkernels/schemas.py declares (csrc/schemas.h is generated from it,
// which says what each operator returns). Loading the library runs this registration.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(mmkernels, m) {
  for (const char* schema : mmkernels::kSchemas) m.def(schema);
}
