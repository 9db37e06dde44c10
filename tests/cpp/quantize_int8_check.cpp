// Host check of plugins/kernels/quantize_int8.cuh (the kernels' own source, compiled here by g++):
// quantize_int8_div(v, s, quantize_int8_inv(s)) must equal clamp(rintf(v / s), -128, 127) for
// every float v and s. Host float arithmetic is IEEE round to nearest, as the device's _rn
// intrinsics and div.rn are; build with -O2 -ffp-contract=off (no FMA contraction; x86-64 SSE has
// no excess precision).
//
//   quantize_int8_check [--random N] [--tie-scales N] [--exhaustive S,S,...] [--threads T] [--seed X]
//
// --random: N random (v, s) pairs from several generators (quotients in and around the int8
// range, wide exponents, realistic amax / 127 scales, raw bit patterns). --tie-scales: N scales
// (fixed lists plus random ones: powers of two, short mantissas whose products are exact ties,
// 1/127-like, tiny and huge), each with v = RN((k + 1/2) s) and RN(k s) for k in [-200, 200] and 8
// float neighbours either side. --exhaustive: every one of the 2^32 float bit patterns of v for
// each listed s. Special values (zeros, infinities, NaNs, subnormals, range edges) always run.
// Prints the counts and the share that took the division; exits 1 on the first mismatches.
#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "quantize_int8.cuh"

namespace {

// The reference, written out here rather than taken from the header: ONNX QuantizeLinear with a
// float32 quotient (rintf: half to even in the default rounding mode).
int8_t reference(float v, float s) {
  return static_cast<int8_t>(std::fmin(std::fmax(std::rint(v / s), -128.f), 127.f));
}

struct Tally {
  uint64_t checked = 0, divided = 0, mismatches = 0;
  void add(const Tally& o) {
    checked += o.checked;
    divided += o.divided;
    mismatches += o.mismatches;
  }
};

std::atomic<int> g_printed{0};

inline void check(float v, float s, float inv, Tally& t) {
  const int8_t want = reference(v, s);
  const int8_t got = essm::quantize_int8_div(v, s, inv);
  int8_t fast;
  t.divided += !essm::quantize_int8_fast(v, inv, &fast);
  ++t.checked;
  if (got != want) {
    ++t.mismatches;
    if (g_printed.fetch_add(1) < 20)
      std::printf("MISMATCH v=%a (%.9g) s=%a (%.9g) inv=%a: want %d got %d\n", v, v, s, s, inv, want,
                  got);
  }
}

inline void check(float v, float s, Tally& t) { check(v, s, essm::quantize_int8_inv(s), t); }

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

struct Rng {  // splitmix64
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return static_cast<uint32_t>(next() >> 32); }
  int range(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint64_t>(hi - lo + 1)); }
  float unit() { return static_cast<float>(next() >> 40) * 0x1p-24f; }  // [0, 1)
  float sign() { return next() & 1 ? -1.f : 1.f; }
  // a positive normal float with a random mantissa and exponent in [elo, ehi]
  float normal(int elo, int ehi) {
    return from_bits((static_cast<uint32_t>(range(elo, ehi) + 127) << 23) | (u32() & 0x7FFFFF));
  }
};

// Random scales: mixes of the whole normal range, realistic amax / 127 and short mantissas.
float random_scale(Rng& r) {
  switch (r.range(0, 5)) {
    case 0: return r.normal(-126, 127);
    case 1: return r.normal(-30, 30);
    case 2: return r.normal(-20, 20) / 127.f;                       // amax / 127
    case 3: return std::ldexp(static_cast<float>(r.range(1, 4095)), r.range(-110, 100));  // short
    case 4: return std::ldexp(1.f, r.range(-126, 127));             // powers of two
    default: return r.next() & 1 ? r.normal(-105, -95) : r.normal(95, 105);  // fast-range edges
  }
}

constexpr int kGenerators = 8;
const char* const kGeneratorNames[kGenerators] = {
    "quotient uniform in [-300, 300], s = amax / 127", "quotient uniform in [-300, 300], random s",
    "same",
    "quotient 2^[-40, 41], random scale", "v, s independent normals",
    "quotient within 2^-11 of a half-integer", "subnormal v or edge scales", "raw bit patterns"};

void random_pairs(uint64_t n, uint64_t seed, Tally (&by_gen)[kGenerators]) {
  Rng r{seed};
  for (uint64_t i = 0; i < n; ++i) {
    float v, s;
    switch (i % 8) {
      case 0:
      case 1:
      case 2: {  // quotient uniform in and around the int8 range (case 0: realistic scales)
        s = i % 8 == 0 ? r.normal(-20, 20) / 127.f : random_scale(r);
        const float y = r.sign() * r.unit() * 300.f;
        v = static_cast<float>(static_cast<double>(y) * s);
        break;
      }
      case 3: {  // quotient with a wide exponent
        s = random_scale(r);
        v = r.sign() * static_cast<float>(std::ldexp(1.0 + r.unit(), r.range(-40, 40)) * s);
        break;
      }
      case 4: {  // v and s independent over wide exponent ranges
        s = r.normal(-126, 127);
        v = r.sign() * r.normal(-126, 127);
        break;
      }
      case 5: {  // quotient near a half-integer: (k + 1/2 + tiny) s
        s = random_scale(r);
        const double y = r.range(-140, 140) + 0.5 + std::ldexp(r.unit() - 0.5, -r.range(10, 30));
        v = static_cast<float>(y * s);
        break;
      }
      case 6: {  // subnormal v, or s near the edges of the fast range
        s = i % 16 == 6 ? r.normal(-126, -90) : r.normal(90, 127);
        v = r.sign() * (i % 32 < 16 ? from_bits(r.u32() & 0x7FFFFF) : r.normal(-126, 127));
        break;
      }
      default:  // raw bit patterns: NaN, inf, subnormal and negative scales included
        v = from_bits(r.u32());
        s = from_bits(r.u32());
    }
    check(v, s, by_gen[i % 8]);
  }
}

// v = RN(h s) and its float neighbours for half-integers and integers h with |h| <= 200.5.
void ties_for_scale(float s, Tally& t) {
  const float inv = essm::quantize_int8_inv(s);
  for (int k2 = -401; k2 <= 401; ++k2) {
    const double h = k2 * 0.5;  // exact product below: at most 9 + 24 bits
    const float v0 = static_cast<float>(h * static_cast<double>(s));
    float up = v0, down = v0;
    check(v0, s, inv, t);
    for (int j = 0; j < 8; ++j) {
      up = std::nextafter(up, INFINITY);
      down = std::nextafter(down, -INFINITY);
      check(up, s, inv, t);
      check(down, s, inv, t);
    }
  }
}

std::vector<float> fixed_scales() {
  std::vector<float> s = {1.f, 0.5f, 2.f, 3.f, 0.1f, 1.f / 127.f, 1.f / 128.f, 1.f / 255.f, 0.75f,
                          1.5f, 127.f, 1e-3f, 1e-6f, 1e3f, 1e6f, FLT_MIN, FLT_MAX,
                          0x1p-100f, 0x1p100f, 0x1.fffffep-101f, 0x1.000002p100f,
                          0x1.000002p-100f, 0x1.fffffep99f, 0x1.fffffep+127f, 0x1p-126f, 0x1p-125f};
  for (int e = -126; e <= 127; ++e) s.push_back(std::ldexp(1.f, e));
  for (int a = 1; a <= 300; a += 7) s.push_back(static_cast<float>(a) / 127.f);  // amax / 127
  for (int m = 1; m < 64; ++m) s.push_back(std::ldexp(static_cast<float>(m), -6));  // short mantissas
  return s;
}

void specials(Tally& t) {
  std::vector<float> vs = {0.f, -0.f, INFINITY, -INFINITY, NAN, -NAN, FLT_MAX, -FLT_MAX, FLT_MIN,
                           -FLT_MIN, FLT_TRUE_MIN, -FLT_TRUE_MIN, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f,
                           -2.5f, 126.5f, -126.5f, 127.5f, -127.5f, 128.5f, -128.5f, 127.f, 128.f,
                           -128.f, -129.f, 0x1p22f, -0x1p22f, 0x1p23f, -0x1p23f, 0x1p24f, -0x1p24f,
                           12582912.f, -12582912.f, 0x1.fffffep21f, -0x1.fffffep21f};
  for (int e = -149; e <= 127; ++e) vs.push_back(std::ldexp(1.f, e)), vs.push_back(-std::ldexp(1.f, e));
  std::vector<float> ss = fixed_scales();
  for (float x : {0.f, -0.f, INFINITY, -INFINITY, NAN, -1.f, -FLT_MIN, FLT_TRUE_MIN, 0x1p-140f})
    ss.push_back(x);
  for (float s : ss)
    for (float v : vs) {
      check(v, s, t);
      check(v * s, s, t);  // quotient near v (where representable)
    }
}

void exhaustive(float s, unsigned threads, Tally& total) {
  std::vector<Tally> part(threads);
  std::vector<std::thread> pool;
  const float inv = essm::quantize_int8_inv(s);
  for (unsigned w = 0; w < threads; ++w)
    pool.emplace_back([&, w] {
      const uint64_t lo = (uint64_t{1} << 32) * w / threads, hi = (uint64_t{1} << 32) * (w + 1) / threads;
      for (uint64_t b = lo; b < hi; ++b) check(from_bits(static_cast<uint32_t>(b)), s, inv, part[w]);
    });
  for (auto& th : pool) th.join();
  Tally t;
  for (auto& p : part) t.add(p);
  std::printf("exhaustive s=%a (%.9g): %llu values, %llu divided, %llu mismatches\n", s, s,
              static_cast<unsigned long long>(t.checked), static_cast<unsigned long long>(t.divided),
              static_cast<unsigned long long>(t.mismatches));
  total.add(t);
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t n_random = 10000000, n_tie_scales = 2000, seed = 1;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<float> exhaustive_scales;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* val = i + 1 < argc ? argv[i + 1] : nullptr;
    if (!val) {
      std::fprintf(stderr, "missing value for %s\n", a.c_str());
      return 2;
    }
    ++i;
    if (a == "--random") n_random = std::strtoull(val, nullptr, 10);
    else if (a == "--tie-scales") n_tie_scales = std::strtoull(val, nullptr, 10);
    else if (a == "--threads") threads = std::max(1, std::atoi(val));
    else if (a == "--seed") seed = std::strtoull(val, nullptr, 10);
    else if (a == "--exhaustive") {
      for (char* p = const_cast<char*>(val); *p;) {
        exhaustive_scales.push_back(std::strtof(p, &p));
        if (*p == ',') ++p;
        else if (*p) {
          std::fprintf(stderr, "bad scale list %s\n", val);
          return 2;
        }
      }
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }

  Tally total;
  {
    Tally t;
    specials(t);
    std::printf("specials: %llu pairs, %llu divided, %llu mismatches\n",
                static_cast<unsigned long long>(t.checked), static_cast<unsigned long long>(t.divided),
                static_cast<unsigned long long>(t.mismatches));
    total.add(t);
  }
  {
    const std::vector<float> fixed = fixed_scales();
    std::vector<Tally> part(threads);
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < threads; ++w)
      pool.emplace_back([&, w] {
        Rng r{seed * 7919 + w};
        for (uint64_t i = w; i < fixed.size() + n_tie_scales; i += threads)
          ties_for_scale(i < fixed.size() ? fixed[i] : random_scale(r), part[w]);
      });
    for (auto& th : pool) th.join();
    Tally t;
    for (auto& p : part) t.add(p);
    std::printf("ties: %llu scales, %llu pairs, %llu divided, %llu mismatches\n",
                static_cast<unsigned long long>(fixed.size() + n_tie_scales),
                static_cast<unsigned long long>(t.checked), static_cast<unsigned long long>(t.divided),
                static_cast<unsigned long long>(t.mismatches));
    total.add(t);
  }
  {
    std::vector<std::array<Tally, kGenerators>> part(threads);
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < threads; ++w)
      pool.emplace_back([&, w] {
        Tally by_gen[kGenerators];
        random_pairs(n_random / threads + (w < n_random % threads), (seed << 20) + w + 1, by_gen);
        for (int g = 0; g < kGenerators; ++g) part[w][g] = by_gen[g];
      });
    for (auto& th : pool) th.join();
    Tally t, gen[kGenerators];
    for (auto& p : part)
      for (int g = 0; g < kGenerators; ++g) t.add(p[g]), gen[g].add(p[g]);
    for (int g = 0; g < kGenerators; ++g)
      if (g != 2)
        std::printf("  random %-48s %11llu pairs, divided %.3g%%\n", kGeneratorNames[g],
                    static_cast<unsigned long long>(gen[g].checked + (g == 1 ? gen[2].checked : 0)),
                    100.0 * (gen[g].divided + (g == 1 ? gen[2].divided : 0)) /
                        std::max<uint64_t>(1, gen[g].checked + (g == 1 ? gen[2].checked : 0)));
    std::printf("random: %llu pairs, %llu divided, %llu mismatches\n",
                static_cast<unsigned long long>(t.checked), static_cast<unsigned long long>(t.divided),
                static_cast<unsigned long long>(t.mismatches));
    total.add(t);
  }
  for (float s : exhaustive_scales) exhaustive(s, threads, total);
  std::printf("%s: %llu checked, %llu mismatches\n", total.mismatches ? "FAIL" : "ok",
              static_cast<unsigned long long>(total.checked),
              static_cast<unsigned long long>(total.mismatches));
  return total.mismatches ? 1 : 0;
}
