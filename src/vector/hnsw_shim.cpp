// The two things FAISS's C API cannot do for an HNSW index, for src/vector/faiss.rs (the only
// caller): set efConstruction, and search with a per-query efSearch (SearchParametersHNSW) or
// exactly over the graph's own vector storage, both under an IDSelector. Every function
// catches every exception and reports it through `err` (NUL-terminated, at most `err_len`
// bytes); none throws across the C boundary.

#include <cstdint>
#include <cstring>
#include <exception>

#include <faiss/Index.h>
#include <faiss/IndexHNSW.h>
#include <faiss/impl/HNSW.h>
#include <faiss/impl/IDSelector.h>

namespace {

void report(char* err, size_t err_len, const char* msg) {
    if (err != nullptr && err_len > 0) {
        std::strncpy(err, msg, err_len - 1);
        err[err_len - 1] = '\0';
    }
}

const faiss::IndexHNSW* as_hnsw(const void* index) {
    return dynamic_cast<const faiss::IndexHNSW*>(static_cast<const faiss::Index*>(index));
}

// Runs `body` (which returns 0 or reports and returns -1), turning any exception into -1
// with its message in `err`.
template <class F>
int guarded(char* err, size_t err_len, F body) {
    try {
        return body();
    } catch (const std::exception& e) {
        report(err, err_len, e.what());
        return -1;
    } catch (...) {
        report(err, err_len, "unknown C++ exception");
        return -1;
    }
}

} // namespace

extern "C" {

// 1 when `index` is an HNSW index with its own vector storage, 0 otherwise.
int engram_hnsw_is_graph(const void* index) {
    const faiss::IndexHNSW* h = as_hnsw(index);
    return h != nullptr && h->storage != nullptr ? 1 : 0;
}

// Sets efConstruction on an empty HNSW index. 0 on success.
int engram_hnsw_set_ef_construction(void* index, int ef, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto* h = dynamic_cast<faiss::IndexHNSW*>(static_cast<faiss::Index*>(index));
        if (h == nullptr) {
            report(err, err_len, "not an HNSW index");
            return -1;
        }
        h->hnsw.efConstruction = ef;
        return 0;
    });
}

// One query's k best among `sel` (null: all). exact != 0 scans the graph's vector storage
// (every selected vector scored); otherwise a graph search with `ef` candidates. The ids are
// the graph's own (insertion order). 0 on success.
int engram_hnsw_search(
        const void* index,
        const float* query,
        int64_t k,
        int ef,
        const void* sel,
        int exact,
        float* distances,
        int64_t* labels,
        char* err,
        size_t err_len) {
    return guarded(err, err_len, [&] {
        const faiss::IndexHNSW* h = as_hnsw(index);
        if (h == nullptr || h->storage == nullptr) {
            report(err, err_len, "not an HNSW index with storage");
            return -1;
        }
        auto* selector = const_cast<faiss::IDSelector*>(static_cast<const faiss::IDSelector*>(sel));
        if (exact) {
            faiss::SearchParameters params;
            params.sel = selector;
            h->storage->search(1, query, k, distances, labels, &params);
        } else {
            faiss::SearchParametersHNSW params;
            params.sel = selector;
            params.efSearch = ef;
            h->search(1, query, k, distances, labels, &params);
        }
        return 0;
    });
}

} // extern "C"
