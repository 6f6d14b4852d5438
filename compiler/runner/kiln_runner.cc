// kiln_runner: run a Kiln module on a board with only libtvm_runtime.so and libtvm_ffi.so (no Python,
// no compiler). Written by `kiln package`; build it with the target's cross compiler (for armv7:
// arm-linux-gnueabihf-g++, against the runtime that scripts/setup_armv7.sh builds):
//   aarch64-linux-gnu-g++ -std=c++17 -O2 -I<tvm_ffi/include> kiln_runner.cc -o kiln_runner \
//     -Llib -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib'
// Usage:  kiln_runner model.so model.inputs [INPUT.bin ...] [--repeat N]
//   model.inputs: one line per input, "NAME DTYPE DIM0 DIM1 ..." (written by `kiln package`).
//   INPUT.bin: raw little-endian data in input order (numpy: a.tofile("x.bin")); missing inputs are ones.
// Writes output0.bin, output1.bin, ... in the current directory and prints each output's shape and sum.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct CPUAlloc {  // 64-byte aligned host memory, as TVM kernels expect
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

template <typename T>
static void Fill(ffi::Tensor* t, T value) {
  std::fill_n(static_cast<T*>(t->data_ptr()), t->numel(), value);
}

static void FillOnes(ffi::Tensor* t) {  // an input left out: ones of its dtype
  DLDataType d = t->dtype();
  if (d.code == kDLFloat && d.bits == 32) Fill<float>(t, 1.0f);
  else if (d.code == kDLFloat && d.bits == 64) Fill<double>(t, 1.0);
  else if (d.code == kDLInt && d.bits == 64) Fill<int64_t>(t, 1);
  else if (d.code == kDLInt && d.bits == 32) Fill<int32_t>(t, 1);
  else if ((d.code == kDLInt || d.code == kDLUInt || d.code == kDLBool) && d.bits == 8) Fill<int8_t>(t, 1);
  else std::memset(t->data_ptr(), 0, ffi::GetDataSize(*t));  // other dtypes: zeros
}

static void Collect(const ffi::Any& v, std::vector<ffi::Tensor>* out) {  // outputs: a tensor or nested tuples
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else {
    for (const ffi::Any& item : v.cast<ffi::Array<ffi::Any>>()) Collect(item, out);
  }
}

static ffi::Any Call(const ffi::Function& f, const std::vector<ffi::Any>& args) {
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  f.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
  return result;
}

int main(int argc, char** argv) {
  std::vector<std::string> files;
  int repeat = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) repeat = std::atoi(argv[++i]);
    else files.push_back(argv[i]);
  }
  if (files.size() < 2) {
    std::fprintf(stderr, "usage: %s model.so model.inputs [INPUT.bin ...] [--repeat N]\n", argv[0]);
    return 2;
  }
  if (files[0].find('/') == std::string::npos) files[0] = "./" + files[0];  // dlopen searches bare names
  ffi::Module lib = ffi::Module::LoadFromFile(files[0]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);  // device 0, pooled allocator
  ffi::Function run = vm->GetFunction("main").value();

  std::ifstream spec(files[1]);
  if (!spec) { std::fprintf(stderr, "cannot read %s\n", files[1].c_str()); return 1; }
  std::vector<ffi::Any> args;
  for (std::string line; std::getline(spec, line);) {
    std::istringstream fields(line);
    std::string name, dtype;
    if (!(fields >> name >> dtype)) continue;
    std::vector<int64_t> shape;
    for (int64_t d; fields >> d;) shape.push_back(d);
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), ffi::StringToDLDataType(dtype),
                                             DLDevice{kDLCPU, 0});
    size_t bytes = ffi::GetDataSize(t), k = args.size() + 2;
    if (k < files.size()) {
      std::ifstream in(files[k], std::ios::binary);
      if (!in.read(static_cast<char*>(t.data_ptr()), bytes)) {
        std::fprintf(stderr, "%s: expected %zu bytes for input %s\n", files[k].c_str(), bytes, name.c_str());
        return 1;
      }
    } else {
      FillOnes(&t);
    }
    args.push_back(t);
  }
  ffi::Any result = Call(run, args);
  std::vector<ffi::Tensor> outs;
  Collect(result, &outs);
  for (size_t i = 0; i < outs.size(); ++i) {
    const ffi::Tensor& o = outs[i];
    std::string shape;
    for (int d = 0; d < o.ndim(); ++d) shape += (d ? "x" : "") + std::to_string(o.size(d));
    double sum = 0;
    if (o.dtype().code == kDLFloat && o.dtype().bits == 32)
      for (int64_t j = 0; j < o.numel(); ++j) sum += static_cast<const float*>(o.data_ptr())[j];
    std::ofstream("output" + std::to_string(i) + ".bin", std::ios::binary)
        .write(static_cast<const char*>(o.data_ptr()), ffi::GetDataSize(o));
    std::printf("output%zu: %s %s sum %.6g -> output%zu.bin\n", i, shape.c_str(),
                std::string(ffi::DLDataTypeToString(o.dtype())).c_str(), sum, i);
  }
  if (repeat > 0) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeat; ++r) Call(run, args);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("mean latency %.3f ms over %d runs\n", ms / repeat, repeat);
  }
  return 0;
}
