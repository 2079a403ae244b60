/* Benchmark workload: N threads blocked in a condition variable, then idles. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int started;
static void *idle(void *a) { pthread_mutex_lock(&mu); started++; for (;;) pthread_cond_wait(&cv, &mu); return a; }
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    setvbuf(stdout, 0, _IONBF, 0);
    pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setstacksize(&at, 64 << 10);
    for (int i = 0; i < n; i++) { pthread_t t; if (pthread_create(&t, &at, idle, 0)) return 1; }
    for (;;) { pthread_mutex_lock(&mu); int s = started; pthread_mutex_unlock(&mu); if (s == n) break; usleep(1000); }
    printf("ready\n");
    while (access("go", 0)) usleep(10000);
    return 0;
}
