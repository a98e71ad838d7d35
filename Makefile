# A thin wrapper over meson: the README's two commands, `make demo` and `make test`.
BUILD ?= build
ASAN  ?= build-asan
MESON_OPTS ?=

.PHONY: all deps demo test bench fuzz clean

all: $(BUILD)/build.ninja
	ninja -C $(BUILD)

deps:
	./deploy/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) $(MESON_OPTS)

demo:
	./deploy/install-deps.sh
	[ -f $(BUILD)/build.ninja ] || meson setup $(BUILD) $(MESON_OPTS)
	ninja -C $(BUILD)
	$(BUILD)/cli/semoe demo --build $(BUILD)

# The normal build runs unit, proto, net and fault; a clang address+undefined build without
# CUDA runs unit, proto and net again. Benchmarks and GPU tests are not part of it.
test:
	./deploy/install-deps.sh --test
	[ -f $(BUILD)/build.ninja ] || meson setup $(BUILD) $(MESON_OPTS)
	ninja -C $(BUILD)
	meson test -C $(BUILD) --print-errorlogs --suite unit --suite proto --suite net --suite fault
	[ -f $(ASAN)/build.ninja ] || CC=clang meson setup $(ASAN) -Dcuda=disabled \
	    -Db_sanitize=address,undefined -Db_lundef=false
	ninja -C $(ASAN)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	    meson test -C $(ASAN) --print-errorlogs --suite unit --suite proto --suite net
	@a=$$(grep -c '"result": "OK"' $(BUILD)/meson-logs/testlog.json); \
	 b=$$(grep -c '"result": "OK"' $(ASAN)/meson-logs/testlog.json); \
	 echo "make test: $$a tests in the normal build and $$b in the sanitizer build, all OK"; \
	 echo "semoe: $$((a + b)) passed, 0 failed"

bench: $(BUILD)/build.ninja
	ninja -C $(BUILD)
	meson test -C $(BUILD) --suite bench --print-errorlogs || true
	$(BUILD)/bench/bench_control
	$(BUILD)/bench/bench_train_cpu
	$(BUILD)/bench/bench_train_workers
	$(BUILD)/bench/bench_train_workers --hidden 512
	$(BUILD)/bench/bench_skew

fuzz:
	[ -f build-fuzz/build.ninja ] || CC=clang meson setup build-fuzz -Dcuda=disabled -Dfuzz=true
	ninja -C build-fuzz tests/fuzz_proto
	mkdir -p tests/fuzz/corpus-new
	build-fuzz/tests/fuzz_proto -max_total_time=$${FUZZ_SECONDS:-300} -max_len=65536 \
	    -artifact_prefix=tests/fuzz/crashes/ tests/fuzz/corpus-new tests/fuzz/corpus

clean:
	rm -rf $(BUILD) $(ASAN) build-fuzz
